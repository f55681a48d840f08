"""The train step compiled for Cloud TPU slices and GPU nodes on this CPU: XLA's memory and FLOPs
per device.

    python benchmarks/compile_targets.py --runs=pretrain.py:small,dpo.py:large --devices=v5p-8
    python benchmarks/compile_targets.py --devices=h100x8,a100x8 --layers=unrolled

For every config x devices x remat (x layers scanned / unrolled with --layers=both) it runs the
planner's ahead-of-time compile (`planning.plan(..., compile=True)`, what
`python -m notagen_jax.plan --devices=DEVICES --compile` prints) and writes one markdown row: the
mesh, compile seconds, XLA's peak memory per device against the planner's estimate and the memory
a run may use (a TPU's HBM, JAX's share of a GPU's), and XLA's FLOPs per device against 3 x
forward (XLA:GPU gives none when compiling without a GPU). TPU slices need libtpu (`pip install
"jax[tpu]"`), GPU nodes JAX's CUDA plugin (`pip install "jax[cuda12]"`); no TPU or GPU. Batches
are per data-parallel device (`--rows_per_device`).
"""

import importlib.util
import itertools
import pathlib

from absl import app
from absl import flags
import jax

from notagen_jax import planning

import machine  # benchmarks/machine.py

REPO = pathlib.Path(__file__).resolve().parents[1]

_RUNS = flags.DEFINE_list("runs", ["pretrain.py:small", "pretrain.py:medium", "pretrain.py:large",
                                   "dpo.py:large"], "configs/*.py[:size] to compile.")
_DEVICES = flags.DEFINE_list("devices", ["v5p-8", "v5p-64", "v5e-256"],
                             "TPU slices and GPU nodes, as plan's --devices names them.")
_REMAT = flags.DEFINE_list("remat", ["false", "true"], "Remat settings to compile.")
_LAYERS = flags.DEFINE_enum("layers", "scanned", ["scanned", "unrolled", "both"],
                            "Layer stacks scanned (model.scan_layers) or unrolled.")
_ROWS = flags.DEFINE_integer("rows_per_device", 1, "Rows (DPO: pairs) per data-parallel device.")


def load_config(spec: str, remat: bool, scan: bool):
  """configs/FILE[:size], as `--config=` reads it, with this table's batch, remat and layers."""
  file, _, size = spec.partition(":")
  module = importlib.util.module_from_spec(
      importlib.util.spec_from_file_location(file, REPO / "configs" / file))
  module.__spec__.loader.exec_module(module)
  c = module.get_config(size) if size else module.get_config()
  c.data.batch_size, c.data.per_device_batch_size = 0, _ROWS.value
  c.model.remat, c.model.scan_layers = remat, scan
  return c


def row(spec: str, devices: str, remat: bool, scan: bool) -> str:
  c = load_config(spec, remat, scan)
  cells = [spec, devices, "remat" if remat else "-", "scanned" if scan else "unrolled"]
  try:
    p = planning.plan(c, devices=devices, compile=True)
  except ValueError as error:
    return "| " + " | ".join(cells + [f"refused: {error}"] + [""] * 6) + " |"
  x, usable = p.compiled, p.topology.usable_bytes
  mesh = "x".join(map(str, p.mesh_shape))
  estimate_flops = p.flops_per_step / p.n_devices
  cells += [mesh, f"{x.seconds:.0f}", f"{x.memory['peak'] / planning.GiB:.1f}",
            f"{p.total_bytes(remat) / planning.GiB:.1f}", f"{x.memory['peak'] / usable:.0%}",
            _flops(x), f"{estimate_flops / 1e12:.1f}"]
  return "| " + " | ".join(cells) + " |"


def _flops(x: planning.Compiled) -> str:
  """XLA's TFLOP per device, `>=` where its cost analysis counted collective-matmul loops once."""
  if not x.flops:
    return "n/a"
  return (">= " if x.windowed_loops else "") + f"{x.flops / 1e12:.1f}"


def main(argv):
  del argv
  machine.print_header()
  jax.config.update("jax_platforms", "cpu")
  print("| config | devices | remat | layers | mesh (data x fsdp x tensor) | compile s | XLA peak "
        "GiB/device | estimate GiB | of usable memory | XLA TFLOP/device/step | estimate |")
  print("|" + "---|" * 11)
  scans = {"scanned": [True], "unrolled": [False], "both": [False, True]}[_LAYERS.value]
  for spec, devices, remat, scan in itertools.product(_RUNS.value, _DEVICES.value, _REMAT.value,
                                                      scans):
    print(row(spec, devices, remat == "true", scan), flush=True)


if __name__ == "__main__":
  app.run(main)
