# The recipe the example runs share, sourced by them: Mini-o3's GRPO settings and Glimpse's plugin.
# GRPO over groups; no KL (neither in the reward nor as a loss), no entropy bonus; clip 0.2 low / 0.3 high;
# token-mean loss; dynamic sampling: groups whose rewards are all equal ("acc", the reward function's key) are
# dropped and more prompts drawn until the batch is full (verl's default V1 trainer; the legacy one,
# trainer.use_v1=false, has no group filter). Validation samples at temperature 1, as the paper's Avg@k does.
PLUGIN=$(python -m glimpse.train.verl)
AGENT=${AGENT:-glimpse}            # glimpse_no_mask for the unmasked ablation
TRAIN=${TRAIN:-data/train.parquet}
VAL=${VAL:-data/val.parquet}
RECIPE=(
  algorithm.adv_estimator=grpo
  algorithm.use_kl_in_reward=false
  algorithm.filter_groups.enable=true
  algorithm.filter_groups.metric=acc
  data.train_files="$TRAIN"
  data.val_files="$VAL"
  data.max_prompt_length=4096
  data.return_raw_chat=true
  actor_rollout_ref.model.path="$MODEL"
  actor_rollout_ref.model.enable_gradient_checkpointing=true
  actor_rollout_ref.actor.use_dynamic_bsz=true
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=0.3
  actor_rollout_ref.actor.use_kl_loss=false
  actor_rollout_ref.actor.entropy_coeff=0
  actor_rollout_ref.actor.loss_agg_mode=token-mean
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.temperature=1.0
  actor_rollout_ref.rollout.val_kwargs.temperature=1.0
  actor_rollout_ref.rollout.calculate_log_probs=true
  +actor_rollout_ref.rollout.limit_images=12    # the original and up to 11 crops; not in verl's YAML, hence +
  actor_rollout_ref.rollout.multi_turn.enable=true
  actor_rollout_ref.rollout.agent.agent_loop_config_path="$PLUGIN/agent_loop.yaml"
  actor_rollout_ref.rollout.agent.default_agent_loop="$AGENT"
  reward.custom_reward_function.path=pkg://glimpse.train.verl.reward
  reward.custom_reward_function.name=compute_score
  trainer.project_name=glimpse
  trainer.logger='["console"]'
  trainer.save_freq=20
  trainer.test_freq=20
  trainer.total_epochs=1
)
