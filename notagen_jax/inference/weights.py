"""How the sampler stores the blocks' weight matrices, and how a stored matrix multiplies.

Generation reads every weight once per character, so the bytes a matrix is stored in bound a step.
A stored matrix is the [K, N] matrix of one parameter (the model's decode path multiplies
[K, N] matrices): `x @ w` multiplies it as stored (`inference_matmul`, through `__rmatmul__`),
`astype` gives the parameter back with its own shape, rounded as stored.

Formats: bfloat16 (8 significant bits, half float32's bytes), int8 with a float32 scale per 32
input rows and output column (nearly a quarter), and float32 in column blocks of 16 (the same
numbers, in the layout of the CPU kernel that multiplies them fastest).
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from notagen_jax import model as model_lib
from notagen_jax.inference import cpu_kernels

DTYPES = ("float32", "bfloat16", "int8")
QUANT_BLOCK = cpu_kernels.QUANT_BLOCK


class StoredMatrix:
  """A parameter's [K, N] matrix stored for sampling. Subclasses have `shape` (the parameter's
  own), `dtype`, `matrix_shape` and `matrix(dtype)`, the [K, N] view widened to dtype."""

  def __rmatmul__(self, x: jax.Array) -> jax.Array:
    return inference_matmul(x, self)

  def astype(self, dtype: jnp.dtype) -> jax.Array:
    return self.matrix(dtype).reshape(self.shape)


def _input_size(w: jax.Array, input_axes: int) -> int:
  return math.prod(w.shape[:input_axes])


@flax.struct.dataclass
class Bfloat16Weight(StoredMatrix):
  """A weight matrix [K, N] stored in bfloat16, multiplied with float32 sums."""
  values: jax.Array  # bfloat16 [K, N]
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # the parameter's own shape

  @classmethod
  def of(cls, w: jax.Array, input_axes: int) -> Bfloat16Weight:
    """w's first `input_axes` axes are K (flattened), the rest N."""
    return cls(w.reshape(_input_size(w, input_axes), -1).astype(jnp.bfloat16), tuple(w.shape))

  @property
  def dtype(self) -> jnp.dtype:
    return self.values.dtype

  @property
  def matrix_shape(self) -> tuple[int, int]:
    return self.values.shape

  def matrix(self, dtype: jnp.dtype) -> jax.Array:
    return self.values.astype(dtype)


@flax.struct.dataclass
class Int8Weight(StoredMatrix):
  """A weight matrix stored as int8 [K, N] with a float32 scale per 32 rows of K.

  Symmetric round-to-nearest per block of 32 input rows and output column, like llama.cpp's Q8_0
  (blocks along the input axis): an outlying weight sets the scale of 32 weights, not of a whole
  column. The int8 values are kept in `cpu_kernels`' tiles of 8 rows x 16 columns, which its
  kernel reads as one sequential stream.
  """
  values: jax.Array  # int8 [K / 8, N / 16, 8, 16]: tile (g, c) holds rows 8g.., columns 16c..
  scales: jax.Array  # float32 [K // QUANT_BLOCK, N]
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # the parameter's own shape

  @classmethod
  def quantize(cls, w: jax.Array, input_axes: int) -> Int8Weight:
    """w's first `input_axes` axes are K (flattened), the rest N."""
    k = _input_size(w, input_axes)
    n = w.size // k
    if k % QUANT_BLOCK or n % cpu_kernels.TILE_COLUMNS:
      raise ValueError(f"int8 weights need an input size divisible by {QUANT_BLOCK} and an output "
                       f"size divisible by {cpu_kernels.TILE_COLUMNS}, got {w.shape} "
                       f"(K {k}, N {n})")
    blocks = w.astype(jnp.float32).reshape(k // QUANT_BLOCK, QUANT_BLOCK, n)
    scales = jnp.max(jnp.abs(blocks), axis=1) / 127
    scales = jnp.where(scales > 0, scales, 1.0)
    values = jnp.round(blocks / scales[:, None]).astype(jnp.int8).reshape(k, n)
    return cls(cpu_kernels.tile(values), scales, tuple(w.shape))

  @property
  def dtype(self) -> jnp.dtype:
    return self.values.dtype

  @property
  def matrix_shape(self) -> tuple[int, int]:
    return cpu_kernels.untiled_shape(self.values.shape)

  def integers(self) -> jax.Array:
    """The int8 values as a [K, N] matrix."""
    return cpu_kernels.untile(self.values)

  def matrix(self, dtype: jnp.dtype) -> jax.Array:
    """The dequantized [K, N] view."""
    k, n = self.matrix_shape
    blocks = self.integers().reshape(k // QUANT_BLOCK, QUANT_BLOCK, n).astype(jnp.float32)
    return (blocks * self.scales[:, None]).reshape(k, n).astype(dtype)


@flax.struct.dataclass
class ColumnBlockWeight(StoredMatrix):
  """A float32 weight matrix [K, N] kept for CPU sampling in `cpu_kernels.column_blocks`' layout
  [N / 16, K, 16], for `cpu_kernels.matmul_column_blocks`: the same numbers, a faster product at
  every batch size (see that function)."""
  blocks: jax.Array  # float32 [N / 16, K, 16]
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # the parameter's own shape

  @classmethod
  def of(cls, w: jax.Array, input_axes: int) -> ColumnBlockWeight:
    """w's first `input_axes` axes are K (flattened), the rest N (a multiple of 16)."""
    k = _input_size(w, input_axes)
    if (w.size // k) % cpu_kernels.COLUMN_BLOCK:
      raise ValueError(f"column blocks need an output size divisible by "
                       f"{cpu_kernels.COLUMN_BLOCK}, got {w.shape}")
    return cls(cpu_kernels.column_blocks(w.reshape(k, -1)), tuple(w.shape))

  @property
  def dtype(self) -> jnp.dtype:
    return self.blocks.dtype

  @property
  def matrix_shape(self) -> tuple[int, int]:
    return self.blocks.shape[1], self.blocks.shape[0] * cpu_kernels.COLUMN_BLOCK

  def matrix(self, dtype: jnp.dtype) -> jax.Array:
    return cpu_kernels.from_column_blocks(self.blocks).astype(dtype)


def _xla_matmul(x: jax.Array, w: jax.Array | StoredMatrix) -> jax.Array:
  if isinstance(w, StoredMatrix):
    w = w.matrix(jnp.bfloat16 if isinstance(w, Int8Weight) else w.dtype)
  return jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(x.dtype)


def inference_matmul(x: jax.Array, w: jax.Array | StoredMatrix) -> jax.Array:
  """x @ w [K, N] in x's dtype, with w read as stored and the products summed in float32.

  XLA's CPU dot is fast on bfloat16 operands only with a float32 result, and slow at one row:
  there a few float32 rows take `cpu_kernels`' kernels, which widen each weight exactly (x stays
  float32). Elsewhere int8 weights are dequantized to bfloat16 first. float32 weights kept in
  column blocks take their kernel at any number of rows.
  """
  if isinstance(w, Bfloat16Weight):
    w = w.values
  few_rows = math.prod(x.shape[:-1]) <= cpu_kernels.MAX_ROWS
  if isinstance(w, ColumnBlockWeight):
    kernel = lambda x, w: cpu_kernels.matmul_column_blocks(x, w.blocks)
  elif isinstance(w, Int8Weight):
    kernel = cpu_kernels.matmul_int8 if few_rows else None
  else:
    kernel = cpu_kernels.matmul if w.dtype == jnp.bfloat16 and few_rows else None
  if kernel is not None and x.dtype == jnp.float32 and cpu_kernels.available():
    return jax.lax.platform_dependent(x, w, cpu=kernel, default=_xla_matmul)
  return _xla_matmul(x, w)


def _is_stored(p) -> bool:
  return isinstance(p, StoredMatrix)


def _map_matrices(f, params: nnx.State) -> nnx.State:
  """params with f(matrix, input_axes) in place of each of the blocks' weight matrices.

  Only the blocks' matrices: the rest (embeddings, biases, LayerNorms) is ~2% of the small model's
  bytes, and stored narrower it would be widened again at every step.
  """
  def convert(path, p):
    input_axes = model_lib.Block.MATRIX_INPUT_AXES.get(getattr(path[-2], "key", None))
    return p if input_axes is None else f(p, input_axes)

  return jax.tree_util.tree_map_with_path(convert, params, is_leaf=_is_stored)


def store(params: nnx.State, dtype: str | None) -> nnx.State:
  """params with the blocks' matrices stored in `dtype` (one of DTYPES; None: their own dtype),
  bfloat16 and int8 ones as `Bfloat16Weight`s and `Int8Weight`s."""
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"weights dtype {dtype!r} is not one of {DTYPES}")

  def convert(p, input_axes):
    if dtype == "int8":
      return Int8Weight.quantize(p, input_axes)
    p = p if dtype is None else p.astype(dtype)
    return Bfloat16Weight.of(p, input_axes) if p.dtype == jnp.bfloat16 else p

  return _map_matrices(convert, params)


def in_column_blocks(params: nnx.State) -> nnx.State:
  """params with the blocks' float32 matrices as `ColumnBlockWeight`s (where N is a multiple of
  16): the layout of the kernel that multiplies them at any number of rows on a CPU (1.2x XLA's
  dot at one row, 1.9x at 8, 1.4x at 32, `benchmarks/cpu_matmul_throughput.py`)."""
  def convert(p, input_axes):
    if (not isinstance(p, jax.Array) or p.dtype != jnp.float32 or
        (p.size // _input_size(p, input_axes)) % cpu_kernels.COLUMN_BLOCK):
      return p
    return ColumnBlockWeight.of(p, input_axes)

  return _map_matrices(convert, params)


def dequantized_patch_decoder(params: nnx.State) -> nnx.State:
  """params with the patch decoder's int8 matrices in bfloat16, for prompts.

  A prompt's products take XLA's bfloat16 dot (`inference_matmul`), which would otherwise
  dequantize all of them at every prefill (about a ninth of a 500-patch prompt's prefill on a
  CPU); this keeps them once, at 2 bytes per weight.
  """
  def dequantize(path, p):
    if isinstance(p, Int8Weight) and getattr(path[0], "key", None) == "patch":
      return Bfloat16Weight(p.matrix(jnp.bfloat16), p.shape)
    return p

  return jax.tree_util.tree_map_with_path(dequantize, params, is_leaf=_is_stored)


def as_parameters(stored: nnx.State, like: nnx.State) -> nnx.State:
  """The stored matrices as plain parameters in the dtypes of `like` (rounded as stored)."""
  return jax.tree.map(lambda p, base: p.astype(base.dtype), stored, like, is_leaf=_is_stored)
