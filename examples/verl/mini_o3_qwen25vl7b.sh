#!/usr/bin/env bash
# Mini-o3's RL stage with Glimpse's verl plugin: Qwen2.5-VL-7B (after cold-start SFT), group 16, 256 prompts a
# step in mini-batches of 32, lr 1e-6, a 6-turn cap with over-turn masking, 2M-pixel images, up to 32K tokens a
# trajectory, on 8 nodes x 8 GPUs of a Ray cluster (the shared recipe is in common.sh).
#
# Before: `ray start` on every node (the same Python environment, with `pip install 'glimpse[verl]'`, at the
# same path), and the data converted once:
#   glimpse train verl-data visualprobe:train:/data/minio3 --out data/train.parquet
#   glimpse train verl-data probes:hard:500:11 --out data/val.parquet
# Then, on the head node:  MODEL=/ckpt/minio3-coldstart bash examples/verl/mini_o3_qwen25vl7b.sh
# AGENT=glimpse_no_mask runs the unmasked ablation; extra Hydra overrides may follow on the command line.
set -euo pipefail
MODEL=${MODEL:?set MODEL to the cold-start SFT checkpoint (a Hugging Face folder)}
NODES=${NODES:-8}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

python -m verl.trainer.main_ppo "${RECIPE[@]}" \
  data.train_batch_size=256 \
  data.max_response_length=28672 \
  actor_rollout_ref.model.use_remove_padding=true \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=32 \
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=32768 \
  actor_rollout_ref.rollout.n=16 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
  trainer.nnodes="$NODES" \
  trainer.n_gpus_per_node=8 \
  trainer.experiment_name="minio3-7b-$AGENT" \
  "$@"
