"""`python -m notagen_jax.clamp_dpo --config=configs/clamp_dpo.py[:SIZE] --workdir=DIR`.

K iterations of sample -> score -> select -> DPO train (see notagen_jax/dpo_loop.py), resumable,
with a summary table per iteration in DIR/summary.txt and DIR/score.png. Every path (DIR, the
checkpoint, the prepared corpus) may be local or a gs:// URL. Several processes (a TPU slice,
SLURM, or `--config.distributed.*` as for `train`; launch/*.sh --module=clamp_dpo) share every
stage; DIR must then be reachable from all of them.
"""

from absl import flags
from ml_collections import config_flags

from notagen_jax import cli
from notagen_jax import distributed
from notagen_jax import dpo_loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/clamp_dpo.py[:SIZE]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every iteration is written.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  if _WORKDIR.value:
    with config.unlocked():
      config.workdir = _WORKDIR.value
  dpo_loop.validate(config)  # a wrong value stops every process before any work
  distributed.initialize(config)
  dpo_loop.run(config)  # process 0 prints the summary table after every iteration
  if distributed.is_lead():
    print(f"summary: {config.workdir}/summary.txt  plot: {config.workdir}/score.png")


if __name__ == "__main__":
  cli.run(main)
