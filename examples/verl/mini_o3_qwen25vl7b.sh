#!/usr/bin/env bash
# Mini-o3's RL stage with Glimpse's verl plugin: Qwen2.5-VL-7B (after cold-start SFT), GRPO with group 16,
# a 6-turn cap with over-turn masking, clip 0.2/0.3, no KL, lr 1e-6, dynamic sampling, token-level loss,
# 256 prompts a step in mini-batches of 32, on 8 nodes x 8 GPUs of a Ray cluster.
#
# Before: `ray start` on every node (the same Python environment, with `pip install 'glimpse[verl]'`, at the
# same path), and the data converted once:
#   glimpse train verl-data visualprobe:train:/data/minio3 --out data/train.parquet
#   glimpse train verl-data probes:hard:500:11 --out data/val.parquet
# Then, on the head node:  MODEL=/ckpt/minio3-coldstart bash examples/verl/mini_o3_qwen25vl7b.sh
# (limit_images: the original and up to 11 crops per prompt; a verl field its trainer YAML leaves out, hence +.)
# For the unmasked ablation: AGENT=glimpse_no_mask. Extra Hydra overrides may follow on the command line.
set -euo pipefail
MODEL=${MODEL:?set MODEL to the cold-start SFT checkpoint (a Hugging Face folder)}
TRAIN=${TRAIN:-data/train.parquet}
VAL=${VAL:-data/val.parquet}
AGENT=${AGENT:-glimpse}
NODES=${NODES:-8}
PLUGIN=$(python -m glimpse.train.verl)

python -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  algorithm.use_kl_in_reward=false \
  algorithm.filter_groups.enable=true \
  algorithm.filter_groups.metric=acc \
  algorithm.filter_groups.max_num_gen_batches=8 \
  data.train_files="$TRAIN" \
  data.val_files="$VAL" \
  data.train_batch_size=256 \
  data.max_prompt_length=4096 \
  data.max_response_length=28672 \
  data.filter_overlong_prompts=true \
  data.return_raw_chat=true \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.model.enable_gradient_checkpointing=true \
  actor_rollout_ref.model.use_remove_padding=true \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=32 \
  actor_rollout_ref.actor.use_dynamic_bsz=true \
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=32768 \
  actor_rollout_ref.actor.clip_ratio_low=0.2 \
  actor_rollout_ref.actor.clip_ratio_high=0.3 \
  actor_rollout_ref.actor.use_kl_loss=false \
  actor_rollout_ref.actor.entropy_coeff=0 \
  actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.actor.fsdp_config.param_offload=false \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.mode=async \
  actor_rollout_ref.rollout.n=16 \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
  +actor_rollout_ref.rollout.limit_images=12 \
  actor_rollout_ref.rollout.calculate_log_probs=true \
  actor_rollout_ref.rollout.multi_turn.enable=true \
  actor_rollout_ref.rollout.agent.agent_loop_config_path="$PLUGIN/agent_loop.yaml" \
  actor_rollout_ref.rollout.agent.default_agent_loop="$AGENT" \
  actor_rollout_ref.rollout.val_kwargs.temperature=1.0 \
  actor_rollout_ref.rollout.val_kwargs.do_sample=true \
  reward.custom_reward_function.path=pkg://glimpse.train.verl.reward \
  reward.custom_reward_function.name=compute_score \
  trainer.nnodes="$NODES" \
  trainer.n_gpus_per_node=8 \
  trainer.project_name=glimpse \
  trainer.experiment_name="minio3-7b-$AGENT" \
  trainer.logger='["console"]' \
  trainer.save_freq=20 \
  trainer.test_freq=20 \
  trainer.total_epochs=1 \
  "$@"
