#!/usr/bin/env bash
# The same recipe on one node of 8 GPUs with LoRA (rank 64): Qwen2.5-VL (3B or 7B) after cold-start SFT, group
# 8, 64 prompts a step in mini-batches of 16; LoRA takes a higher learning rate than full fine-tuning (1e-5
# here, against 1e-6), on the language model only (the vision tower stays as the cold start left it, as in
# Mini-o3's SFT). The shared recipe is in common.sh.
#
#   glimpse train verl-data probes:hard:2000:5 --out data/train.parquet
#   glimpse train verl-data probes:hard:200:11 --out data/val.parquet
#   MODEL=/ckpt/coldstart-3b bash examples/verl/single_node_lora.sh
set -euo pipefail
MODEL=${MODEL:?set MODEL to the cold-start SFT checkpoint (a Hugging Face folder)}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

python -m verl.trainer.main_ppo "${RECIPE[@]}" \
  data.train_batch_size=64 \
  data.max_response_length=20480 \
  actor_rollout_ref.model.lora_rank=64 \
  actor_rollout_ref.model.lora_alpha=32 \
  actor_rollout_ref.model.target_modules=all-linear \
  actor_rollout_ref.model.exclude_modules='.*visual.*' \
  actor_rollout_ref.actor.optim.lr=1e-5 \
  actor_rollout_ref.actor.ppo_mini_batch_size=16 \
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24576 \
  actor_rollout_ref.rollout.load_format=safetensors \
  actor_rollout_ref.rollout.layered_summon=true \
  actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
  trainer.nnodes=1 \
  trainer.n_gpus_per_node=8 \
  trainer.experiment_name="lora-$AGENT" \
  "$@"
