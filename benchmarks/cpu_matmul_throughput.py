"""The CPU matmul kernels against XLA's dot, on the products one generation step makes.

  python benchmarks/cpu_matmul_throughput.py [--rows=1,2,3,4,8,32] [--layers=15] [--repeats=30]

One jitted chain of `--layers` GPT-2 blocks' four products (q/k/v 768x2304, attention out 768x768,
MLP 768x3072 and 3072x768; 15 layers = the small model's 3 char layers + 12 patch layers, 212 MB in
bfloat16, more than a CPU's last-level cache holds), each fed the previous one's output so nothing
is skipped.
Per row count: XLA's float32 dot on float32 weights, XLA's dot on bfloat16 weights (x cast to
bfloat16, float32 sums, as `weights.inference_matmul` without the kernel), `cpu_kernels.matmul` on
the same bfloat16 weights, `cpu_kernels.matmul_int8` on them quantized (`weights.Int8Weight`) and
`cpu_kernels.matmul_column_blocks` on the float32 weights in column blocks (what the sampler keeps
on a CPU, `weights.ColumnBlockWeight`). GB/s counts the weight bytes read per chain (int8: values
and scales); the ratios are XLA bfloat16's time over the bfloat16 kernel's (`cpu_kernels.MAX_ROWS`
is set from it) and XLA float32's over the column-block kernel's, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from notagen_jax.inference import cpu_kernels  # noqa: E402
from notagen_jax.inference import weights as weights_lib  # noqa: E402

import machine  # noqa: E402  (benchmarks/machine.py)

HIDDEN = 768


def _chain(product):
  def run(x, weights):
    for qkv, out, fc, proj in weights:
      x = x + product(product(x, qkv)[:, :HIDDEN], out)
      x = x + product(jax.nn.gelu(product(x, fc)), proj)
    return x
  return jax.jit(run)


def _seconds(f, x, weights, repeats: int) -> float:
  f(x, weights).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    result = f(x, weights)
  result.block_until_ready()
  return (time.perf_counter() - start) / repeats


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default="1,2,3,4,8,32")
  parser.add_argument("--layers", type=int, default=15)
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args(argv)
  machine.print_header()
  if not cpu_kernels.available():
    sys.exit(f"kernel unavailable: {cpu_kernels._load()}")  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  shapes = [(HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 4 * HIDDEN), (4 * HIDDEN, HIDDEN)]
  w16 = [[jnp.asarray(rng.standard_normal(s) * 0.02, jnp.bfloat16) for s in shapes]
         for _ in range(args.layers)]
  w32 = [[w.astype(jnp.float32) for w in layer] for layer in w16]
  w8 = [[weights_lib.Int8Weight.quantize(w, 1) for w in layer] for layer in w16]
  paths = {
      "xla f32": (_chain(lambda x, w: x @ w), w32),
      "xla bf16": (_chain(lambda x, w: jnp.matmul(x.astype(w.dtype), w,
                                                  preferred_element_type=jnp.float32)), w16),
      "kernel bf16": (_chain(cpu_kernels.matmul), w16),
      "kernel int8": (_chain(cpu_kernels.matmul_int8), w8),
      "kernel f32 blocks": (_chain(cpu_kernels.matmul_column_blocks),
                            [[cpu_kernels.column_blocks(w) for w in layer] for layer in w32]),
  }
  nbytes = {name: sum(leaf.nbytes for leaf in jax.tree.leaves(w)) for name, (_, w) in paths.items()}
  bytes16 = nbytes["xla bf16"]
  print(f"# {args.layers} layers, {bytes16 / 1e6:.0f} MB of bfloat16 weights, "
        f"{os.cpu_count()} cores, jax {jax.__version__}; ms per chain (GB/s of weights read)")
  header = (f"{'rows':>4}" + "".join(f"{name:>22}" for name in paths) +
            f"{'xla bf16 / kernel':>20}{'xla f32 / blocks':>18}")
  print(header + "\n" + "-" * len(header))
  for rows in (int(r) for r in args.rows.split(",")):
    x = jnp.asarray(rng.standard_normal((rows, HIDDEN)), jnp.float32)
    times = {name: _seconds(f, x, w, args.repeats) for name, (f, w) in paths.items()}
    cells = "".join(f"{t * 1e3:>11.2f} ({nbytes[name] / t / 1e9:5.1f} GB/s)"
                    for name, t in times.items())
    print(f"{rows:>4}{cells}{times['xla bf16'] / times['kernel bf16']:>19.2f}x"
          f"{times['xla f32'] / times['kernel f32 blocks']:>17.2f}x")


if __name__ == "__main__":
  main(sys.argv[1:])
