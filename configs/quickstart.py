"""The README's quickstart: a tiny model, briefly, on a CPU. `--config=configs/quickstart.py:STAGE`.

STAGE is `pretrain` (from scratch, no prompt lines) or `finetune` (from the pre-trained params,
prompt lines kept). Paper values would need days; these give a model that writes recognizable
chorale-like ABC in a few minutes. The CLaMP-DPO stage is `configs/clamp_dpo.py:quickstart`.
"""

from notagen_jax import config as config_lib

STEPS = {"pretrain": 300, "finetune": 500}
LEARNING_RATE = {"pretrain": 2e-3, "finetune": 1e-3}


def get_config(stage: str = "pretrain"):
  if stage not in STEPS:
    raise ValueError(f"quickstart stage {stage!r} is not one of {tuple(STEPS)}")
  c = config_lib.base_config(stage, "tiny")
  c.model.dropout = 0.0  # too few steps to over-fit; dropout would only slow learning
  c.model.char_packing = True
  c.data.num_threads = 0
  c.optimizer.learning_rate = LEARNING_RATE[stage]
  c.optimizer.warmup_steps = STEPS[stage] // 10
  c.optimizer.schedule = "cosine"
  c.train.num_steps = STEPS[stage]
  c.train.log_every = 25
  c.train.eval_every = STEPS[stage]
  c.train.eval_batches = 4
  c.train.checkpoint_every = STEPS[stage]
  return c
