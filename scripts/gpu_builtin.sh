#!/usr/bin/env bash
# The built-in model trained on one GPU machine, then evaluated there; all results under $OUT.
#
#   OUT=/path/to/out [INIT=checkpoint] [MIX=card,easy,medium,hard] [LR=1e-3] bash scripts/gpu_builtin.sh [MINUTES] [WORKERS] [N]
#
# MINUTES of `glimpse train builtin --device cuda` with WORKERS example makers (one per spare core) and replay
# steps while they catch up, then `glimpse eval` on N fresh probes per level (the seeds of the README's expert
# table: seed 0, indices from 0; training draws indices from 1,000,000), the three levels side by side (N=0:
# no evaluation). INIT continues from a checkpoint; MIX sets the example mixture (see glimpse train builtin).
# Written for a machine whose python3 has torch (CUDA), transformers and tokenizers; Python packages Glimpse
# needs beyond those may be given as wheels in .whl/ (installed into /tmp/site, nothing else is touched).
# Comes back: $OUT/model.tar (the checkpoint, weights in bfloat16), $OUT/run.tar (log.jsonl, config.json,
# result.json), $OUT/evals.tar (each level's summary and trajectories) and $OUT/out.log.
set -uo pipefail
MINUTES=${1:-4.5}
WORKERS=${2:-14}
N=${3:-30}
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
exec > >(tee "$OUT/out.log") 2>&1
export PYTHONUNBUFFERED=1 GLIMPSE_HOME=/tmp/glimpse-home TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
nproc

echo "== training =="
python3 -m glimpse train builtin --out /tmp/run --size base --minutes "$MINUTES" --workers "$WORKERS" --threads 2 \
  --batch 32 --lr "${LR:-1e-3}" --warmup 20 --replay 6 --device cuda --init "${INIT:-}" --mix "${MIX:-}" || exit 1
tail -n 3 /tmp/run/log.jsonl | cut -c1-400
python3 - <<'PY'
# Ship-size weights: bfloat16 (half the bytes; the hf backend loads them in float32 on a CPU).
import torch
from transformers import AutoModelForImageTextToText

import glimpse.builtin.model  # noqa: F401  (registers the classes)

model = AutoModelForImageTextToText.from_pretrained("/tmp/run/model")
model.to(torch.bfloat16).save_pretrained("/tmp/run/model")
PY
tar -C /tmp/run -cf "$OUT/model.tar" model
tar -C /tmp/run -cf "$OUT/run.tar" log.jsonl config.json result.json

[ "$N" = 0 ] && exit 0
echo "== evaluation: $N probes per level =="
for level in easy medium hard; do
  timeout "${EVAL_S:-170}" python3 -m glimpse eval --data "probes:$level:$N" --model hf:/tmp/run/model --device cuda \
    --max-turns 6 --concurrency 16 --out "/tmp/eval-$level" > "/tmp/eval-$level.log" 2>&1 &
done
wait
for level in easy medium hard; do echo "-- $level"; tail -n 25 "/tmp/eval-$level.log"; done
tar -C /tmp -cf "$OUT/evals.tar" eval-easy eval-medium eval-hard eval-easy.log eval-medium.log eval-hard.log
ls -la "$OUT"
