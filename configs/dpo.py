"""CLaMP-DPO's training step: `--config=configs/dpo.py:large`.

DPO-Positive (beta 0.1, lambda 10), lr 1e-6, clip 1.0, no schedule, 10,000 steps, as the original;
policy and frozen reference start from `init_checkpoint`. The reference log-probs are computed
once with dropout off (`dpo.precompute_reference`), so the policy trains without dropout too
(`model.dropout=0`, as TRL's DPO does by default); the original recomputed them every step with
dropout on in both (`dpo.precompute_reference=False`, `dpo.reference_dropout=True`,
`model.dropout=0.1`). The batch is one pair per data-parallel device, so the config runs as is
on any slice (on one device: one pair per step, as the original); for a global batch instead set
`data.batch_size=N data.per_device_batch_size=0`.
"""

from notagen_jax import config as config_lib


def get_config(size: str = "large"):
  c = config_lib.base_config("dpo", size)
  c.data.preference_file = ""  # {"chosen": [abc, ...], "rejected": [abc, ...]}
  c.data.batch_size = 0
  c.data.per_device_batch_size = 1
  c.init_checkpoint = ""
  return c
