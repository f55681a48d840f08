"""Training-step throughput (forward + backward) of the JAX model against the PyTorch reference.

  python benchmarks/model_throughput.py [--sizes=tiny,small] [--repeats=3]
  taskset -c 0 python benchmarks/model_throughput.py --threads=1   # one core each

Same weights (the reference's random init, ported), same piece, same thread count, dropout on as in
training. Reports target chars per second, the ratio to PyTorch, and the model FLOP/s (the work a
step needs: 6 x matmul parameters per real patch and per real char position, plus attention) as a
fraction of the machine's peak matmul rate: the best rate of a jnp float32 matmul, measured right
before every timed step, so that load from other processes on the machine (the load average is
printed) hits both alike. Timings are the best of `repeats` steps, implementations interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import machine  # benchmarks/machine.py

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_threads(threads: int) -> None:
  # Must happen before jax / torch start their thread pools. XLA's CPU client uses every core it
  # may run on: the default --threads is all of them; for one core run under `taskset -c 0`.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["OMP_NUM_THREADS"] = str(threads)


def piece(golden: pathlib.Path, n_patches: int):
  """n_patches real patches: the golden chorales one after the other (bos patches dropped)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  cases = json.loads((golden / "cases.json").read_text())["cases"]
  ids = list(cases[0]["patch_ids"])
  for case in cases[1:]:
    ids += case["patch_ids"][1:]
  if len(ids) < n_patches:
    raise ValueError(f"only {len(ids)} golden patches, {n_patches} wanted")
  return np.asarray(ids[:n_patches], np.int32)[None]


def model_flops(cfg, patches) -> float:
  """Forward + backward FLOPs of the work a step needs (pad characters excluded)."""
  n_patches = patches.shape[1]
  n_chars = int((patches[:, 1:] != 0).sum())
  h = cfg.hidden
  per_layer = 24 * h * h  # qkv, attention output, MLP: 2 * 12 H^2 per token
  patch = n_patches * cfg.patch_layers * (per_layer + 2 * h * n_patches)  # causal attention
  char = n_chars * (cfg.char_layers * (per_layer + 2 * h * cfg.patch_size) + 2 * h * cfg.vocab)
  return 3.0 * (patch + char)


def peak_meter(shapes=((2048, 2048, 2048), (4096, 768, 3072), (4096, 3072, 768))):
  """A function measuring the best float32 FLOP/s of jnp matmuls (m, k, n) of a few shapes."""
  import jax  # pylint: disable=import-outside-toplevel
  matmul = jax.jit(lambda a, b: a @ b)
  operands = [(jax.random.normal(jax.random.key(0), (m, k)),
               jax.random.normal(jax.random.key(1), (k, n))) for m, k, n in shapes]

  def measure(repeats: int = 3) -> float:
    return max(2 * a.shape[0] * a.shape[1] * b.shape[1]
               / _best(lambda: matmul(a, b).block_until_ready(), repeats) for a, b in operands)

  return measure


def _timed(step) -> float:
  start = time.perf_counter()
  step()
  return time.perf_counter() - start


def _best(step, repeats: int) -> float:
  step()  # compile / warm up
  return min(_timed(step) for _ in range(repeats))


def torch_step(reference, patches):
  import torch  # pylint: disable=import-outside-toplevel
  reference.train()
  x = torch.from_numpy(patches).long()
  masks = torch.ones(x.shape[:2], dtype=torch.long)

  def step():
    reference.zero_grad(set_to_none=True)
    reference(x, masks)["loss"].backward()

  return step


def jax_step(model, patches, packed: bool):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from notagen_jax import model as model_lib  # pylint: disable=import-outside-toplevel

  mask = np.ones(patches.shape[:2], np.int32)
  packed_len = model_lib.packed_length(patches, mask) if packed else None
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def grad_step(params, key):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest)
      return model_lib.forward(m, patches, mask, deterministic=False,
                               rngs=nnx.Rngs(dropout=key), packed_len=packed_len).loss
    return jax.value_and_grad(loss_fn)(params)

  keys = iter(jax.random.split(jax.random.key(0), 1000))
  return lambda: jax.block_until_ready(grad_step(params, next(keys)))


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--sizes", default="tiny,small")
  parser.add_argument("--patches", type=int, default=253)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--golden", default=str(ROOT / "tests" / "golden"))
  args = parser.parse_args(argv)
  machine.print_header()
  _setup_threads(args.threads)

  import dataclasses  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from notagen_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from notagen_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from notagen_jax import torch_port  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import reference  # pylint: disable=import-outside-toplevel
  torch_reference = reference.torch_reference()

  torch.set_num_threads(args.threads)
  measure_peak = peak_meter()
  peak = measure_peak()
  patches = piece(pathlib.Path(args.golden), args.patches)
  n_chars = int((patches[:, 1:] != 0).sum())
  print(f"# {jax.devices()[0].device_kind}, {args.threads} threads, jax {jax.__version__}, "
        f"torch {torch.__version__}; piece: {patches.shape[1]} patches, {n_chars} target chars "
        f"({1 - n_chars / ((patches.shape[1] - 1) * 16):.0%} pad); load average at start "
        f"{os.getloadavg()[0]:.1f}", flush=True)
  results = []
  for size in args.sizes.split(","):
    patch_length, patch_layers, char_layers, hidden = model_lib.SIZES[size]
    patch_length = max(patch_length, args.patches) if size == "tiny" else patch_length
    torch.manual_seed(0)
    reference = torch_reference.NotaGen(patch_length, patch_layers, char_layers, hidden,
                                        attn_implementation="sdpa")
    state_dict = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    cfg, params = torch_port.params_from_state_dict(state_dict)
    steps = {"torch (sdpa)": torch_step(reference, patches)}
    for packing in (False, True):
      model = checkpoint.build(dataclasses.replace(cfg, char_packing=packing), params)
      steps["jax packed" if packing else "jax unpacked"] = jax_step(model, patches, packing)
    for step in steps.values():
      step()  # compile, warm up
    flops = model_flops(cfg, patches)
    best = {name: float("inf") for name in steps}
    utilization = {name: 0.0 for name in steps}
    for _ in range(args.repeats):
      for name, step in steps.items():
        peak_now = measure_peak()
        peak = max(peak, peak_now)
        seconds = _timed(step)
        best[name] = min(best[name], seconds)
        utilization[name] = max(utilization[name], flops / seconds / peak_now)
    results.append((size, flops, best, utilization))
  print(f"# best peak matmul seen {peak / 1e9:.1f} GFLOP/s (jnp f32); load average at end "
        f"{os.getloadavg()[0]:.1f}; % peak = model FLOP/s over the peak measured just before")
  print(f"{'size':6} {'impl':14} {'step s':>7} {'chars/s':>8} {'vs torch':>8} "
        f"{'GFLOP/s':>8} {'% peak':>7}")
  for size, flops, best, utilization in results:
    baseline = best["torch (sdpa)"]
    for name, seconds in best.items():
      print(f"{size:6} {name:14} {seconds:7.3f} {n_chars / seconds:8.0f} "
            f"{baseline / seconds:7.2f}x {flops / seconds / 1e9:8.1f} {utilization[name]:7.0%}")


if __name__ == "__main__":
  main(sys.argv[1:])
