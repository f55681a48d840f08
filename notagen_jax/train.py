"""`python -m notagen_jax.train --config=configs/pretrain.py:small --workdir=DIR`.

Override any field with `--config.section.field=value`. Multi-process runs (TPU pods, SLURM, or
explicit `--config.distributed.*`) call jax.distributed.initialize first.
"""

import os

import jax
from absl import flags
from absl import logging
from ml_collections import config_flags

from notagen_jax import cli
from notagen_jax import config as config_lib
from notagen_jax import distributed
from notagen_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file[:size].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and TensorBoard go here.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  if _WORKDIR.value:
    config.workdir = _WORKDIR.value
  config_lib.validate(config)  # a wrong value stops the run before any work
  distributed.initialize(config)
  logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
               jax.device_count())
  for name in ("XLA_FLAGS", "LIBTPU_INIT_ARGS"):
    if os.environ.get(name):
      logging.info("%s=%s", name, os.environ[name])
  metrics = trainer.train_and_evaluate(config, config.workdir)
  if jax.process_index() == 0:
    print(" ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())))


if __name__ == "__main__":
  cli.run(main)
