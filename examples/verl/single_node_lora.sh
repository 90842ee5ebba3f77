#!/usr/bin/env bash
# The same recipe on one node of 8 GPUs with LoRA: Qwen2.5-VL (3B or 7B) after cold-start SFT, group 8,
# 64 prompts a step, a 6-turn cap with over-turn masking, clip 0.2/0.3, no KL, dynamic sampling. LoRA takes a
# higher learning rate than full fine-tuning (1e-5 here, against 1e-6).
#
#   glimpse train verl-data probes:hard:2000:5 --out data/train.parquet
#   glimpse train verl-data probes:hard:200:11 --out data/val.parquet
#   MODEL=/ckpt/coldstart-3b bash examples/verl/single_node_lora.sh
set -euo pipefail
MODEL=${MODEL:?set MODEL to the cold-start SFT checkpoint (a Hugging Face folder)}
TRAIN=${TRAIN:-data/train.parquet}
VAL=${VAL:-data/val.parquet}
AGENT=${AGENT:-glimpse}
PLUGIN=$(python -m glimpse.train.verl)

python -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  algorithm.use_kl_in_reward=false \
  algorithm.filter_groups.enable=true \
  algorithm.filter_groups.metric=acc \
  algorithm.filter_groups.max_num_gen_batches=8 \
  data.train_files="$TRAIN" \
  data.val_files="$VAL" \
  data.train_batch_size=64 \
  data.max_prompt_length=4096 \
  data.max_response_length=20480 \
  data.return_raw_chat=true \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.model.lora_rank=64 \
  actor_rollout_ref.model.lora_alpha=32 \
  actor_rollout_ref.model.target_modules=all-linear \
  actor_rollout_ref.model.enable_gradient_checkpointing=true \
  actor_rollout_ref.actor.optim.lr=1e-5 \
  actor_rollout_ref.actor.ppo_mini_batch_size=16 \
  actor_rollout_ref.actor.use_dynamic_bsz=true \
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24576 \
  actor_rollout_ref.actor.clip_ratio_low=0.2 \
  actor_rollout_ref.actor.clip_ratio_high=0.3 \
  actor_rollout_ref.actor.use_kl_loss=false \
  actor_rollout_ref.actor.entropy_coeff=0 \
  actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.mode=async \
  actor_rollout_ref.rollout.load_format=safetensors \
  actor_rollout_ref.rollout.layered_summon=true \
  actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
  +actor_rollout_ref.rollout.limit_images=12 \
  actor_rollout_ref.rollout.multi_turn.enable=true \
  actor_rollout_ref.rollout.agent.agent_loop_config_path="$PLUGIN/agent_loop.yaml" \
  actor_rollout_ref.rollout.agent.default_agent_loop="$AGENT" \
  reward.custom_reward_function.path=pkg://glimpse.train.verl.reward \
  reward.custom_reward_function.name=compute_score \
  trainer.nnodes=1 \
  trainer.n_gpus_per_node=8 \
  trainer.project_name=glimpse \
  trainer.experiment_name="lora-$AGENT" \
  trainer.logger='["console"]' \
  trainer.save_freq=20 \
  trainer.test_freq=20 \
  trainer.total_epochs=1 \
  "$@"
