"""benchmarks/gpu_roofline.py's reading of a compiled program, checked on small CPU programs."""

import importlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
gpu_roofline = importlib.import_module("gpu_roofline")


def _hlo(f, *shapes):
  args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
  return jax.jit(f).lower(*args).compile().as_text()


def test_a_kernel_costs_its_matmul_flops_and_the_bytes_it_reads_and_writes():
  matmul, elementwise = gpu_roofline.kernels(
      _hlo(lambda a, b: jnp.tanh(a @ b) * 2, (64, 32), (32, 48)))
  assert matmul.flops == 2 * 64 * 48 * 32
  assert matmul.bytes == 4 * (64 * 32 + 32 * 48 + 64 * 48)
  # tanh and the product, one fusion: it reads the dot's 64 x 48 and writes as many.
  assert (elementwise.flops, elementwise.bytes) == (0, 2 * 4 * 64 * 48)


def test_a_kernel_below_the_ridge_point_is_bounded_by_memory():
  roofline = gpu_roofline.Roofline(peak=1e12, bandwidth=1e10)  # ridge: 100 FLOP per byte
  compute = gpu_roofline.Kernel("f32[1]", "dot", flops=1e9, bytes=1e6)
  memory = gpu_roofline.Kernel("f32[1]", "dot", flops=1e9, bytes=1e8)
  other = gpu_roofline.Kernel("f32[1]", "add", flops=0.0, bytes=1e8)
  assert [roofline.group(k) for k in (compute, memory, other)] == [
      "matmul", "matmul below ridge", "other"]
  seconds = [roofline.seconds(k) for k in (compute, memory, other)]
  assert seconds == pytest.approx([1e-3, 1e-2, 1e-2])


def test_a_loop_in_the_step_is_refused_by_name():
  def scanned(x, w):
    return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=3)[0]
  with pytest.raises(ValueError, match="while .*model.scan_layers=False"):
    gpu_roofline.kernels(_hlo(scanned, (8, 16), (16, 16)))
