"""Scaling sweeps: `python -m notagen_jax.sweep --config=configs/scaling.py:cpu --workdir=DIR`.

The pre-training config, trained at every shape of `sweep.models` once per compute budget of
`sweep.budgets`, each run for the steps whose model FLOPs (the trainer's count: 3 x the forward
over real patches) reach its budget, with warmup and a cosine decay ending at its last step.
Variants: `cpu` (4 shapes x 3 budgets on 1,000 pieces of music21's corpus; its figures, timing and
machine are in docs/scaling.md) and `smoke` (2 x 2 tiny runs of a few steps: the tests').
"""

import ml_collections

from notagen_jax import config as config_lib


def get_config(variant: str = "cpu"):
  if variant not in ("cpu", "smoke"):
    raise ValueError(f"configs/scaling.py: variant {variant!r} is not 'cpu' or 'smoke'")
  c = config_lib.base_config("pretrain", "tiny")
  c.data.shards_dir = ""  # the dir `python -m notagen_jax.prepare` prints after "shards:"
  c.data.batch_size = 8
  c.model.patch_length = 32  # 512 chars of context: more steps per budget, little padding
  # Runs of at most a few epochs of key-augmented data, as in compute-scaling studies: no dropout.
  c.model.dropout = 0.0
  c.optimizer.learning_rate = 1e-3  # one rate for every shape (not tuned per width)
  c.optimizer.schedule = "cosine"
  c.train.log_every = 25
  c.train.eval_batches = 20  # the final eval reads at most this many batches of data.eval_split

  c.sweep = ml_collections.ConfigDict()
  # Names of model.SIZES, or 'PxCxH': patch-level layers x char-level layers x hidden.
  c.sweep.models = ("1x1x64", "2x1x128", "3x1x192", "4x1x256")
  c.sweep.budgets = (2e11, 6e11, 2e12)  # model FLOPs per run
  c.sweep.warmup_fraction = 0.05  # of each run's steps (replaces optimizer.warmup_steps)
  c.sweep.min_steps = 8  # a budget that leaves a model fewer steps is a config error
  c.sweep.fit = "power"  # on the frontier: 'power' L = a C^-b, 'offset' L = a C^-b + c
  c.sweep.output_dir = ""  # the CSV and PNG; empty: the workdir

  if variant == "smoke":
    c.data.num_threads = 0
    c.train.log_every = 2
    c.train.eval_batches = 1
    c.sweep.models = ("1x1x64", "2x1x64")
    c.sweep.budgets = (1e10, 2e10)
    c.sweep.min_steps = 2
  return c
