"""`python -m notagen_jax.plan --config=configs/pretrain.py:small --devices=v5p-64`.

Prints the resolved mesh, the parameter count, memory per device (params, grads, AdamW state,
activations with and without remat), FLOPs per step and the step time at a stated MFU, for a
named topology (`--devices=v5p-64`, `v4-32`, `v5e-16`, `h100x8`, ...) or a mesh (`--mesh=2,4,1`),
without those devices.

`--compile` compiles the real train step for the devices and prints XLA's memory (per device) and
FLOPs beside the estimates, and refuses a run whose compiled step does not fit in their memory:
for `--devices=cpu` (the default, compiled unless `--nocompile`), for TPU slices, which need
libtpu (`pip install "jax[tpu]"`) but no TPU, and for GPU nodes, which need JAX's CUDA plugin
(`pip install "jax[cuda12]"`, or `"jax[cuda12-local]"` without the CUDA libraries) but no GPU:

  python -m notagen_jax.plan --config=configs/dpo.py:large --devices=v5p-64 --compile
  python -m notagen_jax.plan --config=configs/pretrain.py:large --devices=h100x16 --compile
"""

import jax
from absl import flags
from ml_collections import config_flags

from notagen_jax import cli
from notagen_jax import planning

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file[:size].",
                                          lock_config=True)
_DEVICES = flags.DEFINE_string("devices", None, "v5p-64, v4-32, v5e-16, v6e-8, h100x8, h200x16, "
                               "a100x8 or cpu (default cpu when --mesh is not given).")
_MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes (one may be -1 with --devices); "
                            "default config.mesh.shape.")
_MFU = flags.DEFINE_float("mfu", planning.DEFAULT_MFU, "Model FLOPs utilization for the step time.")
_COMPILE = flags.DEFINE_bool("compile", None, "Compile the train step for the devices (cpu, a "
                              "TPU slice or GPU nodes); default: only for cpu.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  if _DEVICES.value not in (None, "cpu"):
    # A named slice is compiled for through libtpu's or XLA:GPU's description of it: no backend
    # of this host but its CPU is needed (and a TPU or GPU runtime would look for chips that are
    # not here).
    jax.config.update("jax_platforms", "cpu")
  mesh = planning.parse_mesh(_MESH.value) if _MESH.value else None
  result = planning.plan(_CONFIG.value, devices=_DEVICES.value, mesh=mesh, mfu=_MFU.value,
                         compile=_COMPILE.value)
  print(planning.format_plan(result))
  planning.check_fits(result)  # a run that does not fit ends in one line, after the plan


if __name__ == "__main__":
  cli.run(main)
