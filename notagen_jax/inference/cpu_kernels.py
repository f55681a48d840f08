"""CPU kernels (XLA FFI custom calls) for sampling: x @ w for a few float32 rows with bfloat16 or
int8 weights, x @ w for float32 weights in column blocks at any number of rows, and attention over
a KV cache that reads only its filled part.

Batch-1 generation reads every weight once per character, so on a CPU it runs at memory bandwidth:
bfloat16 weights halve the bytes and int8 ones quarter them, but XLA's CPU dot is ~8x slower on a
one-row bfloat16 product than on the float32 one, and has no int8-weight product at all (see
`benchmarks/cpu_matmul_throughput.py`). `cpu_kernels.cc` streams the matrix once, widening each
weight exactly (int8 times its block's scale) and summing in float32; int8 matrices are kept in
tiles of 8 rows x 16 columns (`tile`), so that the kernel reads one sequential stream. float32
weights kept in column blocks (`column_blocks`) are multiplied by `matmul_column_blocks` faster than
by XLA's dot from one row to a batch (its row-major reads are short and strided). XLA's attention
over a cache reads every slot of its capacity (a power of two) at every step; `attention` reads the
keys up to each query's position only.

The source is compiled on first use with the C++ compiler in $CXX (default g++) and `-march=native`,
into $NOTAGEN_JAX_CACHE (default ~/.cache/notagen_jax) under a name that hashes the source, jaxlib's
version, the compiler command and this CPU's model and flags, so a cluster sharing a home directory
builds once per kind of machine. Without a compiler, or with NOTAGEN_JAX_CPU_KERNELS=0,
`available()` is False (the reason logged once) and callers keep XLA's ops: the kernels change
speed, not results beyond float32 summation order.
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
ATTENTION_TARGET = "notagen_attention"
COLUMN_BLOCKS_TARGET = "notagen_column_blocks_matmul"
QUANT_BLOCK = 32  # input rows sharing one int8 scale (cpu_kernels.cc's kQuantBlock)
TILE_ROWS, TILE_COLUMNS = 8, 16  # int8 weights' tiles (cpu_kernels.cc's Layout)
COLUMN_BLOCK = 16  # float32 weights' column blocks (cpu_kernels.cc's ColumnBlocks)
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
  if os.environ.get("NOTAGEN_JAX_CPU_KERNELS", "1") == "0":
    return "disabled by NOTAGEN_JAX_CPU_KERNELS=0"
  compiler = os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    return f"no C++ compiler {compiler!r} on PATH (set CXX)"
  key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, compiler,
                                  _cpu_signature()]).encode()).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get("NOTAGEN_JAX_CACHE",
                                      pathlib.Path.home() / ".cache" / "notagen_jax"))
  library = cache / f"cpu_kernels-{key}.so"
  try:
    if not library.exists():
      cache.mkdir(parents=True, exist_ok=True)
      logging.info("compiling %s into %s", SOURCE.name, library)
      _compile(compiler, library)
    kernels = ctypes.cdll.LoadLibrary(str(library))
    handlers = {TARGET: kernels.NotagenBf16Matmul, INT8_TARGET: kernels.NotagenInt8Matmul,
                ATTENTION_TARGET: kernels.NotagenAttention,
                COLUMN_BLOCKS_TARGET: kernels.NotagenColumnBlocksMatmul}
  except (OSError, RuntimeError, AttributeError) as e:
    return str(e)
  for name, handler in handlers.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
  return None


def available() -> bool:
  """Whether the kernels are built and registered (building them on the first call)."""
  reason = _load()
  if reason is not None:
    _log_unavailable(reason)
  return reason is None


@functools.cache
def _log_unavailable(reason: str) -> None:
  logging.warning("CPU sampling kernels unavailable, using XLA's ops: %s", reason)


def _call(target: str, out: jax.ShapeDtypeStruct, *operands: jax.Array) -> jax.Array:
  if not available():
    raise RuntimeError(f"cpu_kernels unavailable: {_load()}")
  return jax.ffi.ffi_call(target, out)(*operands)


def _product(x: jax.Array, n: int) -> jax.ShapeDtypeStruct:
  """The float32 result of x [..., K] times a matrix of n columns."""
  return jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] float32 @ w [K, N] bfloat16 -> [..., N] float32, summed in float32. CPU only."""
  if x.dtype != jnp.float32 or w.dtype != jnp.bfloat16 or w.ndim != 2:
    raise TypeError(f"cpu_kernels.matmul takes float32 x and 2-D bfloat16 w, got {x.dtype} "
                    f"{x.shape} and {w.dtype} {w.shape}")
  return _call(TARGET, _product(x, w.shape[1]), x, w)


def matmul_int8(x: jax.Array, w) -> jax.Array:
  """x [..., K] float32 @ w -> [..., N] float32, for w a `weights.Int8Weight` (values int8 in
  `tile`'s layout, scales [K / 32, N] float32): weight (k, n) is values[k, n] * scales[k // 32, n].
  CPU only."""
  values, scales = w.values, w.scales
  if (x.dtype != jnp.float32 or values.dtype != jnp.int8 or values.ndim != 4 or
      values.shape[2:] != (TILE_ROWS, TILE_COLUMNS) or
      scales.shape != (values.shape[0] * TILE_ROWS // QUANT_BLOCK, values.shape[1] * TILE_COLUMNS)
      or values.shape[0] * TILE_ROWS % QUANT_BLOCK):
    raise TypeError(f"cpu_kernels.matmul_int8 takes float32 x, int8 tiles [K / 8, N / 16, 8, 16] "
                    f"(K % 32 == 0) and scales [K / 32, N], got {x.dtype} {x.shape}, "
                    f"{values.dtype} {values.shape}, {scales.shape}")
  return _call(INT8_TARGET, _product(x, scales.shape[1]), x, values, scales.astype(jnp.float32))


def tile(matrix: jax.Array) -> jax.Array:
  """[K, N] -> int8 kernel layout [K / 8, N / 16, 8, 16]: tile (g, c) holds rows 8g..8g+7 and
  columns 16c..16c+15, so the kernel's 8-row groups are read as one sequential stream."""
  k, n = matrix.shape
  return matrix.reshape(k // TILE_ROWS, TILE_ROWS, n // TILE_COLUMNS, TILE_COLUMNS).transpose(
      0, 2, 1, 3)


def untiled_shape(tiled_shape: tuple[int, ...]) -> tuple[int, int]:
  return tiled_shape[0] * TILE_ROWS, tiled_shape[1] * TILE_COLUMNS


def untile(tiles: jax.Array) -> jax.Array:
  """The inverse of `tile`."""
  return tiles.transpose(0, 2, 1, 3).reshape(untiled_shape(tiles.shape))


def matmul_column_blocks(x: jax.Array, blocks: jax.Array) -> jax.Array:
  """x [..., K] float32 @ w -> [..., N] float32 for w float32 in `column_blocks`' layout, any
  number of rows (batched decoding: XLA's CPU dot reaches ~60% of the FMA peak at 32 rows, where
  this reads each weight once, in sequential streams, and reuses it from cache for every 8 rows).
  CPU only."""
  if (x.dtype != jnp.float32 or blocks.dtype != jnp.float32 or blocks.ndim != 3 or
      blocks.shape[2] != COLUMN_BLOCK or x.shape[-1] != blocks.shape[1]):
    raise TypeError(f"cpu_kernels.matmul_column_blocks takes float32 x [..., K] and float32 "
                    f"blocks [N / 16, K, 16], got {x.dtype} {x.shape}, {blocks.dtype} "
                    f"{blocks.shape}")
  return _call(COLUMN_BLOCKS_TARGET, _product(x, blocks.shape[0] * COLUMN_BLOCK), x, blocks)


def column_blocks(matrix: jax.Array) -> jax.Array:
  """[K, N] -> [N / 16, K, 16]: block c holds columns 16c..16c+15 of every row."""
  k, n = matrix.shape
  return matrix.reshape(k, n // COLUMN_BLOCK, COLUMN_BLOCK).transpose(1, 0, 2)


def from_column_blocks(blocks: jax.Array) -> jax.Array:
  """The inverse of `column_blocks`."""
  return blocks.transpose(1, 0, 2).reshape(blocks.shape[1], -1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array) -> jax.Array:
  """Causal attention over a KV cache, reading only the keys each query may see. CPU only.

  q [B, N, T, D], k and v [B, N, S, D] float32, start [B] int32: query t of row b is at position
  start[b] + t and attends to keys 0..start[b] + t (softmax in float32, scaled by 1/sqrt(D));
  -> [B, N, T, D] float32. Slots past a row's position are never read, so a step costs what the
  context holds, not the cache's capacity.
  """
  if (q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] != k.shape[:2] or
      q.shape[3] != k.shape[3] or start.shape != q.shape[:1] or
      {a.dtype for a in (q, k, v)} != {jnp.dtype(jnp.float32)}):
    raise TypeError(f"cpu_kernels.attention takes float32 q [B, N, T, D], k and v [B, N, S, D] "
                    f"and start [B], got {q.dtype} {q.shape}, {k.dtype} {k.shape}, "
                    f"{v.dtype} {v.shape}, {start.shape}")
  return _call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), q, k, v,
               start.astype(jnp.int32))
