"""CPU kernels (XLA FFI custom calls) for x @ w: a few float32 rows, bfloat16 or int8 weights.

Batch-1 generation reads every weight once per character, so on a CPU it runs at memory bandwidth:
bfloat16 weights halve the bytes and int8 ones quarter them, but XLA's CPU dot is ~8x slower on a
one-row bfloat16 product than on the float32 one, and has no int8-weight product at all (see
`benchmarks/cpu_matmul_throughput.py`). `cpu_matmul.cc` streams the matrix once, widening each
weight exactly (int8 times its block's scale) and summing in float32.

The source is compiled on first use with the C++ compiler in $CXX (default g++) and `-march=native`,
into $NOTAGEN_JAX_CACHE (default ~/.cache/notagen_jax) under a name that hashes the source, jaxlib's
version, the compiler command and this CPU's model and flags, so a cluster sharing a home directory
builds once per kind of machine. Without a compiler, or with NOTAGEN_JAX_CPU_MATMUL=0, `available()`
is False (the reason logged once) and callers keep XLA's dot: the kernel changes speed, not results
beyond float32 summation order.
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import jaxlib

SOURCE = pathlib.Path(__file__).with_suffix(".cc")
TARGET = "notagen_bf16_matmul"
INT8_TARGET = "notagen_int8_matmul"
QUANT_BLOCK = 32  # input rows sharing one int8 scale (cpu_matmul.cc's kQuantBlock)
# Above this many rows XLA's own bfloat16 dot (with float32 sums) is faster: the kernel re-reads
# its weight slab from cache once per row (benchmarks/cpu_matmul_throughput.py).
MAX_ROWS = 4


def _cpu_signature() -> str:
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor()
  keep = ("model name", "flags", "Features", "CPU part")
  return "\n".join(sorted({l for l in lines if l.split(":")[0].strip() in keep}))


def _compile(compiler: str, out: pathlib.Path) -> None:
  base = [compiler, "-O3", "-shared", "-fPIC", "-std=c++17", "-w",
          f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o"]
  for arch in (["-march=native"], []):
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
      built = pathlib.Path(tmp) / out.name
      result = subprocess.run(base[:1] + arch + base[1:] + [str(built)], capture_output=True,
                              text=True)
      if result.returncode == 0:
        os.replace(built, out)  # atomic: concurrent builders all end with a whole library
        return
  raise RuntimeError(f"{compiler} failed on {SOURCE}:\n{result.stderr[-2000:]}")


@functools.cache
def _load() -> str | None:
  """Builds (once per source and machine), loads and registers the kernel; None, or why not."""
  if os.environ.get("NOTAGEN_JAX_CPU_MATMUL", "1") == "0":
    return "disabled by NOTAGEN_JAX_CPU_MATMUL=0"
  compiler = os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    return f"no C++ compiler {compiler!r} on PATH (set CXX)"
  key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, compiler,
                                  _cpu_signature()]).encode()).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get("NOTAGEN_JAX_CACHE",
                                      pathlib.Path.home() / ".cache" / "notagen_jax"))
  library = cache / f"cpu_matmul-{key}.so"
  try:
    if not library.exists():
      cache.mkdir(parents=True, exist_ok=True)
      logging.info("compiling %s into %s", SOURCE.name, library)
      _compile(compiler, library)
    kernels = ctypes.cdll.LoadLibrary(str(library))
    handlers = {TARGET: kernels.NotagenBf16Matmul, INT8_TARGET: kernels.NotagenInt8Matmul}
  except (OSError, RuntimeError, AttributeError) as e:
    return str(e)
  for name, handler in handlers.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
  return None


def available() -> bool:
  """Whether the kernel is built and registered (building it on the first call)."""
  reason = _load()
  if reason is not None:
    _log_unavailable(reason)
  return reason is None


@functools.cache
def _log_unavailable(reason: str) -> None:
  logging.warning("CPU matmul kernels unavailable, using XLA's dot: %s", reason)


def _call(target: str, x: jax.Array, *operands: jax.Array) -> jax.Array:
  if not available():
    raise RuntimeError(f"cpu_matmul kernel unavailable: {_load()}")
  out = jax.ShapeDtypeStruct(x.shape[:-1] + (operands[0].shape[1],), jnp.float32)
  return jax.ffi.ffi_call(target, out)(x, *operands)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] float32 @ w [K, N] bfloat16 -> [..., N] float32, summed in float32. CPU only."""
  if x.dtype != jnp.float32 or w.dtype != jnp.bfloat16 or w.ndim != 2:
    raise TypeError(f"cpu_matmul.matmul takes float32 x and 2-D bfloat16 w, got {x.dtype} "
                    f"{x.shape} and {w.dtype} {w.shape}")
  return _call(TARGET, x, w)


def matmul_int8(x: jax.Array, w) -> jax.Array:
  """x [..., K] float32 @ w -> [..., N] float32, for w a `model.Int8Weight` (values [K, N] int8,
  scales [K / 32, N] float32): each weight is values[k, n] * scales[k // 32, n]. CPU only."""
  values, scales = w.values, w.scales
  if (x.dtype != jnp.float32 or values.dtype != jnp.int8 or values.ndim != 2 or
      scales.shape != (values.shape[0] // QUANT_BLOCK, values.shape[1]) or
      values.shape[0] % QUANT_BLOCK):
    raise TypeError(f"cpu_matmul.matmul_int8 takes float32 x, int8 values [K, N] (K % 32 == 0) and "
                    f"scales [K / 32, N], got {x.dtype} {x.shape}, {values.dtype} {values.shape}, "
                    f"{scales.shape}")
  return _call(INT8_TARGET, x, values, scales.astype(jnp.float32))
