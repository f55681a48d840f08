"""`python -m notagen_jax.sweep --config=configs/scaling.py:cpu --workdir=DIR`.

Trains every (model, compute budget) run of `config.sweep` that the sweep's CSV (in DIR, or in
`config.sweep.output_dir`) does not already hold, then prints the runs, the power law fitted to
the compute-optimal frontier, and where the CSV and the plot are. Override any field with
`--config.section.field=value`, e.g. `--config.sweep.budgets=1e12,3e12,1e13
--config.sweep.output_dir=docs/scaling`. Every value is checked, and every run's step count
found, before anything is trained. One process.
"""

import functools

from absl import flags
from ml_collections import config_flags

from notagen_jax import cli
from notagen_jax import scaling

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/scaling.py[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "One folder per run goes here (and the CSV and "
                               "plot unless config.sweep.output_dir is set).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  sweep = scaling.plan_sweep(_CONFIG.value, _WORKDIR.value)
  print(scaling.format_plan(sweep), flush=True)
  result = scaling.run_sweep(sweep, report=functools.partial(print, flush=True))
  print(scaling.format_table(result))
  print(f"fit on the compute-optimal frontier: {result.law}")
  print(f"csv: {result.csv_path}")
  print(f"png: {result.png_path}")


if __name__ == "__main__":
  cli.run(main)
