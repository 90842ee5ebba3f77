"""Glimpse inside verl: RL with over-turn masking on many machines, as a plugin (no fork of verl).

Three pieces, each named in a verl config:

* ``glimpse.train.verl.loop.GlimpseAgentLoop``: an ``AgentLoopBase`` subclass, registered through
  ``actor_rollout_ref.rollout.agent.agent_loop_config_path`` (``agent_loop.yaml``, in this package). It runs
  Glimpse's own agent loop (the one behind ``glimpse ask``: protocol, zoom tool, caps, error messages)
  against verl's inference servers, token ids in and token ids out, and zeroes the response mask of
  over-turn trajectories, flagging them in ``extra_fields["over_turn"]``.
* ``glimpse.train.verl.reward.compute_score``: the custom reward function, Glimpse's rule scorer.
* ``glimpse.train.verl.data``: the dataset converter behind ``glimpse train verl-data``: verl's RL parquet
  rows, the original image bytes inline and the Glimpse sample beside them.

Only ``loop`` imports verl; the reward function and the converter run anywhere Glimpse does.
"""
