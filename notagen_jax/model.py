"""NotaGen's hierarchical transformer in Flax NNX: a patch-level GPT-2 and a char-level GPT-2.

The patch-level decoder reads patches of 16 characters (one-hot, flattened, a Linear to H); its
output at patch i conditions
the char-level decoder that predicts the 16 characters of patch i+1. Shapes are static: the char
decoder runs on every (patch i, patch i+1) pair of the batch, [B, L-1, 16], with masks, or on a random
subset of K pairs per piece, or packed (`char_packing`) so that pad characters cost nothing.
Table lookups that need a gradient are one-hot matmuls: a gather's gradient is a scatter-add, slow
on CPU and serial on TPU, while the matmul is exact (one non-zero term) and cheap at vocab 128.

Every parameter carries logical axis names (`out_sharding` metadata, read by
`nnx.get_partition_spec`): 'vocab', 'embed', 'mlp', 'heads', 'kv', 'patch_in', 'position'.

The blocks are stored one per layer, whatever `scan_layers` says: it only changes how the pass
runs them (stacked by `stack_layers` on a leading 'layers' axis, one block compiled and scanned),
so checkpoints, the torch port and the sampler never see the difference.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from notagen_jax import fusion
from notagen_jax import losses
from notagen_jax import sharding

HEAD_DIM = 64
LN_EPS = 1e-5
# (patch_length, patch_layers, char_layers, hidden): the paper's sizes and the golden data's tiny.
SIZES = {
    "tiny": (256, 2, 1, 128),
    "small": (2048, 12, 3, 768),
    "medium": (2048, 16, 3, 1024),
    "large": (1024, 20, 6, 1280),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the model; `dtype` is the compute dtype, parameters stay `param_dtype`."""
  patch_size: int = 16
  patch_length: int = 2048
  patch_layers: int = 12
  char_layers: int = 3
  hidden: int = 768
  vocab: int = 128
  dropout: float = 0.1
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  # Train on K random target patches per piece (0 = all); only while training (not deterministic).
  patch_sampling: int = 0
  # Pack the char-level sequences of a piece end to end so pad characters are not computed.
  char_packing: bool = False
  # Run each decoder's blocks as one block scanned over layers: compiled once, not once per layer.
  # The same numbers and parameters; more memory without remat (see SCAN_SAVED).
  scan_layers: bool = False

  def __post_init__(self):
    if self.hidden % HEAD_DIM:
      raise ValueError(f"hidden {self.hidden} is not a multiple of the head size {HEAD_DIM}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise ValueError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}")

  @property
  def heads(self) -> int:
    return self.hidden // HEAD_DIM

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> ModelConfig:
    return cls(**json.loads(text))


def shape_of(size: str) -> tuple[int, int, int]:
  """(patch_layers, char_layers, hidden) of a preset name or a 'PxCxH' string (e.g. '2x1x128')."""
  if size in SIZES:
    return SIZES[size][1:]
  parts = str(size).split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"model size {size!r} is neither one of {tuple(SIZES)} nor 'PxCxH' "
                     "(patch layers x char layers x hidden, e.g. '2x1x128')")
  patch_layers, char_layers, hidden = map(int, parts)
  if hidden % HEAD_DIM:
    raise ValueError(f"model size {size!r}: hidden {hidden} is not a multiple of the head size "
                     f"{HEAD_DIM}")
  return patch_layers, char_layers, hidden


def config_for(size: str | tuple[int, int, int, int], **overrides: Any) -> ModelConfig:
  """A config from a preset name or a (patch_length, patch_layers, char_layers, hidden) tuple."""
  patch_length, patch_layers, char_layers, hidden = SIZES[size] if isinstance(size, str) else size
  return ModelConfig(patch_length=patch_length, patch_layers=patch_layers,
                     char_layers=char_layers, hidden=hidden, **overrides)


class Extra(nnx.Variable):
  """A tensor kept only so that exported checkpoints round-trip (never trained, never read)."""


def _param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], names: tuple[str | None, ...],
           cfg: ModelConfig) -> nnx.Param:
  # Sharding is applied later by rules over these names (jit out_shardings), not eagerly here.
  return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)),
                   out_sharding=names, eager_sharding=False)


_normal = nnx.initializers.normal(0.02)
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """LayerNorm computed in float32 whatever the compute and parameter dtypes."""
  f32 = lambda a: a.astype(jnp.float32)
  return _layer_norm32(f32(x), f32(scale), f32(bias)).astype(x.dtype)


@jax.custom_vjp
def _layer_norm32(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  return _layer_norm32_fwd(x, scale, bias)[0]


def _layer_norm32_fwd(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + LN_EPS)
  normed = (x - mean) * inv_std
  return normed * scale + bias, (normed, inv_std, scale)


def _layer_norm32_bwd(residuals, g):
  """The exact gradient, its sums written as products with a vector of ones.

  Autodiff's sums of products (gradient x normalized input) become fused XLA CPU reductions
  that run far slower than the same sums as matrix-vector products (about 25x for a 2944 x 768
  block).
  """
  normed, inv_std, scale = residuals
  h = normed.shape[-1]
  rows, g_rows = normed.reshape(-1, h), g.reshape(-1, h)
  over_rows = jnp.ones(rows.shape[0], jnp.float32)
  grad_scale = over_rows @ (g_rows * rows)
  grad_bias = over_rows @ g_rows
  g_normed = g_rows * scale
  mean_over_h = jnp.full((h,), 1 / h, jnp.float32)
  centred = g_normed - (g_normed @ mean_over_h)[:, None]
  grad_x = (centred - rows * ((g_normed * rows) @ mean_over_h)[:, None]).reshape(g.shape)
  return grad_x * inv_std, grad_scale, grad_bias


_layer_norm32.defvjp(_layer_norm32_fwd, _layer_norm32_bwd)


class LayerNorm(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.scale = _param(rngs, _ones, (cfg.hidden,), ("embed",), cfg)
    self.bias = _param(rngs, _zeros, (cfg.hidden,), ("embed",), cfg)

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...], self.bias[...])


class Dropout(nnx.Module):
  """Inverted dropout drawing 16 random bits per element, not `nnx.Dropout`'s 32-bit uniform.

  Drawing the bits is most of dropout's cost on a CPU, and half the bits halve it. The rate is
  rounded to a multiple of 1/65536 (0.1 becomes 0.100006) and kept values are scaled by the
  exact keep probability, so the expectation is unchanged.
  """

  def __init__(self, rate: float):
    self.rate = rate
    self.threshold = round(rate * 65536)

  def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    if deterministic or self.threshold == 0:
      return x
    if rngs is None:
      raise ValueError("dropout while training needs rngs with a 'dropout' stream")
    keep = jax.random.bits(rngs.dropout(), x.shape, jnp.uint16) >= self.threshold
    return jnp.where(keep, x * (65536 / (65536 - self.threshold)), 0).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, drop: Dropout,
              deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
  """Masked attention over [B, T, N, D]; mask broadcasts to [B, N, T, S] (True = attend).

  Without dropout this is `jax.nn.dot_product_attention`; with it the probabilities are needed
  explicitly, so it is written out (softmax in float32).
  """
  if deterministic or drop.rate == 0.0:
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask, logits / math.sqrt(q.shape[-1]), jnp.finfo(jnp.float32).min)
  probs = checkpoint_name(jax.nn.softmax(logits, axis=-1), "attn_probs")
  probs = drop(probs, deterministic=False, rngs=rngs)
  return jnp.einsum("bnts,bsnd->btnd", probs.astype(v.dtype), v)


def _local_keys(x: jax.Array, block: int, fill: int = 0) -> jax.Array:
  """[R, C, ...] -> [R*C/block, 2*block, ...]: each block of C preceded by the block before it."""
  blocks = x.reshape(x.shape[0], -1, block, *x.shape[2:])
  pad = [(0, 0), (1, 0)] + [(0, 0)] * (blocks.ndim - 2)
  previous = jnp.pad(blocks, pad, constant_values=fill)[:, :-1]
  both = jnp.concatenate([previous, blocks], axis=2)
  return both.reshape(-1, 2 * block, *x.shape[2:])


@flax.struct.dataclass
class KVCache:
  """One attention layer's keys and values for inference, [B, N, S, D].

  Heads before positions: attention then reads each head's keys and values in place, where the
  [B, S, N, D] order of the activations made XLA transpose the whole cache at every step. A
  sampler may keep a subclass that attends its own way (`notagen_jax.inference.kv_cache`).
  """
  k: jax.Array
  v: jax.Array

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, length: int) -> KVCache:
    shape = (batch, cfg.heads, length, HEAD_DIM)
    return cls(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))

  def attend(self, q: jax.Array, start: jax.Array) -> jax.Array:
    """Attention of queries q [B, N, T, D] at positions start[b] + t over the keys up to each
    query's position -> [B, N, T, D] in q's dtype."""
    return cached_attention(q, self.k, self.v, start)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array) -> jax.Array:
  """`jax.nn.dot_product_attention`'s computation on a cache's [B, N, S, D] layout (`KVCache`)."""
  positions = start[:, None] + jnp.arange(q.shape[2])
  logits = jnp.einsum("bntd,bnsd->bnts", q, k.astype(q.dtype),
                      preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  mask = jnp.arange(k.shape[2]) <= positions[:, None, :, None]
  logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  # Heads stay leading: XLA's CPU dot then takes its fast batched path (asked for [B, T, N, D]
  # directly, a 512-patch prompt's took 2.5x as long).
  return jnp.einsum("bnts,bnsd->bntd", probs, v.astype(q.dtype))


def _matrix(param: nnx.Param, input_axes: int) -> Any:
  """A weight as the [K, N] matrix that the decode path multiplies.

  The parameter's array, or a matrix that the sampler stored in its own format
  (`notagen_jax.inference.weights`): that one is [K, N] already and computes `x @ w` itself.
  """
  w = param.get_value()
  return w.reshape(math.prod(w.shape[:input_axes]), -1) if isinstance(w, jax.Array) else w


def _dense(x: jax.Array, w: Any) -> jax.Array:
  """x @ w; a parameter's array in x's dtype, as the full forward multiplies it."""
  return x @ (w.astype(x.dtype) if isinstance(w, jax.Array) else w)


class Block(nnx.Module):
  """A GPT-2 block: pre-LN attention (fused q/k/v) and a 4H GELU(tanh) MLP, dropout on residuals."""

  # How many leading axes of each weight matrix are its input (K) axes.
  MATRIX_INPUT_AXES = {"qkv": 1, "attn_out": 2, "fc": 1, "proj": 1}

  def __init__(self, cfg: ModelConfig, n_layers: int, rngs: nnx.Rngs):
    h, n = cfg.hidden, cfg.heads
    # GPT-2 scales the residual output projections by 1/sqrt(2 * n_layers) at init.
    out_init = nnx.initializers.normal(0.02 / math.sqrt(2 * n_layers))
    self.cfg = cfg
    self.ln_1 = LayerNorm(cfg, rngs)
    self.qkv = _param(rngs, _normal, (h, 3, n, HEAD_DIM), ("embed", None, "heads", "kv"), cfg)
    self.qkv_bias = _param(rngs, _zeros, (3, n, HEAD_DIM), (None, "heads", "kv"), cfg)
    self.attn_out = _param(rngs, out_init, (n, HEAD_DIM, h), ("heads", "kv", "embed"), cfg)
    self.attn_out_bias = _param(rngs, _zeros, (h,), ("embed",), cfg)
    self.ln_2 = LayerNorm(cfg, rngs)
    self.fc = _param(rngs, _normal, (h, 4 * h), ("embed", "mlp"), cfg)
    self.fc_bias = _param(rngs, _zeros, (4 * h,), ("mlp",), cfg)
    self.proj = _param(rngs, out_init, (4 * h, h), ("mlp", "embed"), cfg)
    self.proj_bias = _param(rngs, _zeros, (h,), ("embed",), cfg)
    self.drop = Dropout(cfg.dropout)

  def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v [B, T, N, D] of x [B, T, H]."""
    dt = x.dtype
    h, qkv, qkv_bias = self.ln_1(x), self.qkv[...].astype(dt), self.qkv_bias[...].astype(dt)
    # Three projections rather than one fused einsum: each output is already [B, T, N, D], which
    # spares XLA activation transposes both ways (the small model's CPU step ran ~20% faster).
    return tuple(checkpoint_name(jnp.einsum("bth,hnd->btnd", h, qkv[:, i]) + qkv_bias[i], "qkv")
                 for i in range(3))

  def _finish(self, x: jax.Array, y: jax.Array, deterministic: bool,
              rngs: nnx.Rngs | None) -> jax.Array:
    """The residual stream after attention output y [B, T, N, D]: projection, then the MLP."""
    dt = x.dtype
    w = lambda p: p[...].astype(dt)
    y = checkpoint_name(y, "attn_out")
    y = jnp.einsum("btnd,ndh->bth", y, w(self.attn_out)) + w(self.attn_out_bias)
    x = x + self.drop(y, deterministic=deterministic, rngs=rngs)
    x = checkpoint_name(fusion.materialized_grad(x), "residual")
    y = checkpoint_name(self.ln_2(x) @ w(self.fc) + w(self.fc_bias), "mlp_hidden")
    y = jax.nn.gelu(y, approximate=True)
    y = y @ w(self.proj) + w(self.proj_bias)
    return x + self.drop(y, deterministic=deterministic, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None, local_block: int = 0) -> jax.Array:
    """x [B, T, H]. With local_block, each query block attends to itself and the block before."""
    x = fusion.materialized_grad(x)
    q, k, v = self._project(x)
    if local_block:
      b, t = q.shape[:2]
      k, v = _local_keys(k, local_block), _local_keys(v, local_block)
      q = q.reshape(-1, local_block, *q.shape[2:])
      y = attention(q, k, v, mask, self.drop, deterministic, rngs).reshape(b, t, *q.shape[2:])
    else:
      y = attention(q, k, v, mask, self.drop, deterministic, rngs)
    return self._finish(x, y, deterministic, rngs)

  def decode(self, x: jax.Array, cache: KVCache, start: jax.Array) -> tuple[jax.Array, KVCache]:
    """Inference on x [B, T, H] at positions start[b] + t, reading and extending the cache.

    Keys beyond a query's position are masked, so cache slots past a row's end may hold anything.
    Generation reads every weight for a token or a few, so this is written for XLA to read them in
    place: a single token takes one product with the whole fused q/k/v weight (slicing it, as
    `_project` does, copies the slices at every step), 2-D products elsewhere, and the cache is
    written by an element-wise scatter (a row-wise update copied the whole cache at every step). A
    prompt (T > 1) takes `_project`, whose numbers match the full forward's, unless the sampler
    stored the weights its own way (see `_matrix`).
    """
    b, t, h = x.shape
    n = self.cfg.heads
    positions = start[:, None] + jnp.arange(t)
    axes = self.MATRIX_INPUT_AXES
    qkv_weight = _matrix(self.qkv, axes["qkv"])
    if t == 1:
      qkv = _dense(self.ln_1(x)[:, 0], qkv_weight) + self.qkv_bias[...].reshape(-1)
      q, k, v = jnp.unstack(qkv.reshape(b, 3, n, 1, HEAD_DIM), axis=1)  # [B, N, T, D]
    elif isinstance(qkv_weight, jax.Array):
      q, k, v = (a.transpose(0, 2, 1, 3) for a in self._project(x))
    else:
      qkv = _dense(self.ln_1(x), qkv_weight).reshape(b, t, 3, n, HEAD_DIM) + self.qkv_bias[...]
      q, k, v = (a.transpose(0, 2, 1, 3) for a in jnp.unstack(qkv, axis=2))
    index = (jnp.arange(b)[:, None, None, None], jnp.arange(n)[:, None, None],
             positions[:, None, :, None], jnp.arange(HEAD_DIM))
    write = lambda c, u: c.at[index].set(u.astype(c.dtype), mode="promise_in_bounds",
                                         unique_indices=True)
    cache = cache.replace(k=write(cache.k, k), v=write(cache.v, v))
    y = cache.attend(q, start).transpose(0, 2, 1, 3)
    y = _dense(y.reshape(b, t, h), _matrix(self.attn_out, axes["attn_out"]))
    x = x + (y + self.attn_out_bias[...]).astype(x.dtype)
    y = _dense(self.ln_2(x), _matrix(self.fc, axes["fc"])) + self.fc_bias[...]
    y = jax.nn.gelu(y, approximate=True)
    y = _dense(y, _matrix(self.proj, axes["proj"])) + self.proj_bias[...]
    return x + y.astype(x.dtype), cache


LAYERS = "layers"  # logical name of the stacked blocks' leading axis (never sharded)
# What a scanned layer keeps for the backward pass when remat is off: its products' outputs and
# the attention probabilities; the element-wise rest (LayerNorms, GELU, dropout masks) is
# recomputed. A scan keeps its residuals whole where XLA fuses unrolled layers' away: the small
# model's step compiled for a v5p-8 needs 13 GiB per device unrolled, 24 GiB scanned with these
# names, 46 GiB keeping everything (with remat: 4.2 and 5.0 GiB).
SCAN_SAVED = ("qkv", "attn_probs", "attn_out", "residual", "mlp_hidden")


def stack_layers(blocks: Sequence[Block]) -> Block:
  """One Block whose parameters are the blocks' stacked on a leading 'layers' axis."""
  graphdef, _ = nnx.split(blocks[0])
  states = [nnx.split(block)[1] for block in blocks]
  stack = lambda *layers: layers[0].replace(jnp.stack([v[...] for v in layers]),
                                            out_sharding=(LAYERS, *layers[0].out_sharding))
  return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=_is_variable))


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _run_blocks(blocks: nnx.List, x: jax.Array, mask: jax.Array, cfg: ModelConfig,
                deterministic: bool, rngs: nnx.Rngs | None, local_block: int = 0) -> jax.Array:
  def apply(block: Block, x: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    return block(x, mask, deterministic=deterministic, rngs=rngs, local_block=local_block)

  if cfg.remat:
    apply = nnx.remat(apply)
  elif cfg.scan_layers:
    apply = nnx.remat(apply, policy=jax.checkpoint_policies.save_only_these_names(*SCAN_SAVED))
  if not cfg.scan_layers:
    for block in blocks:
      x = apply(block, x, mask, rngs)
    return x

  # The rngs are carried, so that layer i draws the dropout keys it draws unrolled.
  @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry,
            transform_metadata={nnx.PARTITION_NAME: LAYERS})
  def layer(carry: tuple[jax.Array, nnx.Rngs | None], block: Block, mask: jax.Array):
    x, rngs = carry
    # The carry's sharding is chosen for the whole loop: pinned to the batch, or XLA may split it
    # over the hidden axis as the fsdp-sharded weights are (every device then runs every row).
    x = sharding.constrain_batch(apply(block, sharding.constrain_batch(x), mask, rngs))
    return x, rngs

  x, _ = layer((x, rngs), stack_layers(blocks), mask)
  return x


def lookup(table: jax.Array, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """table[ids] as a one-hot matmul (see the module docstring), in `dtype`."""
  one_hot = jax.nn.one_hot(ids, table.shape[0], dtype=dtype)
  return jnp.einsum("...v,vh->...h", one_hot, table.astype(dtype))


def _causal(t: int) -> jax.Array:
  return jnp.tril(jnp.ones((t, t), bool))


class PatchDecoder(nnx.Module):
  """One-hot patch -> Linear -> + positions -> GPT-2 stack -> LayerNorm, causal over patches."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    n_in = cfg.patch_size * cfg.vocab
    bound = 1 / math.sqrt(n_in)  # torch Linear's default bias init
    bias_init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    self.cfg = cfg
    self.embed = _param(rngs, _normal, (n_in, cfg.hidden), ("patch_in", "embed"), cfg)
    self.embed_bias = _param(rngs, bias_init, (cfg.hidden,), ("embed",), cfg)
    self.pos = _param(rngs, _normal, (cfg.patch_length, cfg.hidden), ("position", "embed"), cfg)
    # The original's GPT2Model has a [1, H] token embedding it never uses.
    self.unused_wte = Extra(_normal(rngs.params(), (1, cfg.hidden), jnp.dtype(cfg.param_dtype)))
    self.blocks = nnx.List([Block(cfg, cfg.patch_layers, rngs) for _ in range(cfg.patch_layers)])
    self.ln_f = LayerNorm(cfg, rngs)
    self.drop = Dropout(cfg.dropout)

  def __call__(self, patches: jax.Array, mask: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    """patches [B, L, P] int, mask [B, L] -> hidden [B, L, H] (compute dtype)."""
    length = patches.shape[1]
    x = self._embed(patches, self.pos[...][:length])
    x = self.drop(x, deterministic=deterministic, rngs=rngs)
    attn_mask = _causal(length)[None, None] & mask.astype(bool)[:, None, None, :]
    x = _run_blocks(self.blocks, x, attn_mask, self.cfg, deterministic, rngs)
    return self.ln_f(x)

  def _embed(self, patches: jax.Array, positions: jax.Array, gather: bool = False) -> jax.Array:
    """The original's Linear over the flattened one-hot patch; its 16 terms summed in float32.

    With `gather` the 16 rows are gathered and summed (inference: no gradient needed; a 512-patch
    prompt's one-hot product takes about 4x as long as this, and its sums come out equal).
    """
    dt = jnp.dtype(self.cfg.dtype)
    if gather:
      rows = patches + self.cfg.vocab * jnp.arange(patches.shape[-1])
      picked = jnp.take(self.embed[...], rows, axis=0, mode="clip")
      x = picked.astype(dt).astype(jnp.float32).sum(axis=-2)
    else:
      one_hot = jax.nn.one_hot(patches, self.cfg.vocab, dtype=dt).reshape(*patches.shape[:2], -1)
      x = jnp.einsum("bli,ih->blh", one_hot, self.embed[...].astype(dt),
                     preferred_element_type=jnp.float32)
    return (x + self.embed_bias[...] + positions).astype(dt)

  def decode(self, patches: jax.Array, cache: list[KVCache],
             start: jax.Array) -> tuple[jax.Array, list[KVCache]]:
    """Inference on patches [B, T, P] at positions start[b] + t -> hidden [B, T, H] and the cache."""
    positions = start[:, None] + jnp.arange(patches.shape[1])
    x = self._embed(patches.astype(jnp.int32), self.pos[...][positions], gather=True)
    cache = list(cache)
    for i, block in enumerate(self.blocks):
      x, cache[i] = block.decode(x, cache[i], start)
    return self.ln_f(x), cache


class CharDecoder(nnx.Module):
  """GPT-2 LM over [patch output, c1, ..., c16] with its head tied to the char embedding."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.wte = _param(rngs, _normal, (cfg.vocab, cfg.hidden), ("vocab", "embed"), cfg)
    self.wpe = _param(rngs, _normal, (cfg.patch_size + 1, cfg.hidden), ("position", "embed"), cfg)
    self.blocks = nnx.List([Block(cfg, cfg.char_layers, rngs) for _ in range(cfg.char_layers)])
    self.ln_f = LayerNorm(cfg, rngs)
    self.drop = Dropout(cfg.dropout)

  def embed(self, first: jax.Array, chars: jax.Array, positions: jax.Array) -> jax.Array:
    """Input embedding: `first` (the patch output) where position is 0, else wte[chars]; + wpe."""
    dt = jnp.dtype(self.cfg.dtype)
    x = jnp.where((positions == 0)[..., None], first.astype(dt), lookup(self.wte[...], chars, dt))
    return x + lookup(self.wpe[...], positions, dt)

  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None, local_block: int = 0) -> jax.Array:
    """x [B, T, H] input embeddings -> float32 log-softmax over the vocabulary [B, T, V]."""
    x = self.drop(x, deterministic=deterministic, rngs=rngs)
    x = _run_blocks(self.blocks, x, mask, self.cfg, deterministic, rngs, local_block)
    return self._logprobs(x)

  def _logprobs(self, x: jax.Array) -> jax.Array:
    logits = jnp.einsum("bth,vh->btv", self.ln_f(x), self.wte[...].astype(x.dtype),
                        preferred_element_type=jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)

  def decode(self, x: jax.Array, cache: list[KVCache],
             start: jax.Array) -> tuple[jax.Array, list[KVCache]]:
    """Inference on input embeddings x [B, T, H] at start[b] + t -> log-probs [B, T, V], cache."""
    cache = list(cache)
    for i, block in enumerate(self.blocks):
      x, cache[i] = block.decode(x, cache[i], start)
    return self._logprobs(x), cache


class NotaGen(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.patch = PatchDecoder(cfg, rngs)
    self.char = CharDecoder(cfg, rngs)


def create(cfg: ModelConfig, seed: int = 0) -> NotaGen:
  """A randomly initialized model, initialized in one compiled call (eager init is slow)."""
  return nnx.jit(NotaGen, static_argnums=0)(cfg, nnx.Rngs(seed))


@flax.struct.dataclass
class Output:
  """What one forward pass gives; char arrays are [B, L-1, P]: target patch i+1 of each piece."""
  char_logprob: jax.Array  # log p of each target char, 0 where not counted
  char_mask: jax.Array  # 1.0 for the real target chars that count (pad and unsampled pairs: 0)
  hidden: jax.Array  # [B, L, H] patch-level output

  @property
  def patch_logprob(self) -> jax.Array:
    return self.char_logprob.sum(-1)

  @property
  def sum_logprob(self) -> jax.Array:
    """[B] summed log-prob of each piece (DPO's sequence log-prob)."""
    return self.char_logprob.sum((1, 2))

  @property
  def n_chars(self) -> jax.Array:
    return self.char_mask.sum((1, 2))

  @property
  def loss(self) -> jax.Array:
    """Mean NLL over all counted target chars of the batch: the original's training loss."""
    return losses.nll(self.char_logprob, self.char_mask)


def _unpacked_logprob(char: CharDecoder, encoded: jax.Array, targets: jax.Array,
                      deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
  """Log p of targets [B, K, P] given encoded [B, K, H], every pair a row of P positions.

  Position k reads c_k (position 0 the patch output) and predicts c_(k+1); the original's 17th
  position only predicts past the patch, so it is not computed.
  """
  b, k, p = targets.shape
  targets = targets.reshape(b * k, p)
  inputs = jnp.pad(targets[:, :-1], [(0, 0), (1, 0)])
  positions = jnp.broadcast_to(jnp.arange(p), inputs.shape)
  x = sharding.constrain_batch(char.embed(encoded.reshape(b * k, 1, -1), inputs, positions))
  key_valid = (inputs != 0) | (positions == 0)
  mask = _causal(p)[None, None] & key_valid[:, None, None, :]
  logprobs = char(x, mask, deterministic=deterministic, rngs=rngs)
  return _pick(logprobs, targets).reshape(b, k, p)


def _pick(logprobs: jax.Array, labels: jax.Array) -> jax.Array:
  """logprobs[..., labels] as a masked sum, whose gradient needs no scatter."""
  return jnp.sum(logprobs * jax.nn.one_hot(labels, logprobs.shape[-1], dtype=logprobs.dtype), -1)


def packed_length(patches: np.ndarray, mask: np.ndarray, multiple: int = 64) -> int:
  """Smallest packed row length (a multiple of `multiple`) that holds every piece's char steps."""
  steps = _pair_steps(jnp.asarray(patches)[:, 1:], _pair_valid(jnp.asarray(mask)))
  need = int(np.asarray(steps.sum(-1)).max(initial=1))
  return max(multiple, -(-need // multiple) * multiple)


def _pair_valid(mask: jax.Array) -> jax.Array:
  mask = mask.astype(bool)
  return mask[:, :-1] & mask[:, 1:]


def _pair_steps(targets: jax.Array, valid: jax.Array) -> jax.Array:
  """Char positions a pair needs: up to its last non-pad target char."""
  p = targets.shape[-1]
  last = jnp.max(jnp.where(targets != 0, jnp.arange(1, p + 1), 0), axis=-1)
  return jnp.where(valid, last, 0)


def _packed_logprob(char: CharDecoder, encoded: jax.Array, targets: jax.Array, valid: jax.Array,
                    length: int, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
  """Same numbers as `_unpacked_logprob`, with each piece's pairs laid end to end in one row.

  Slot s of a row holds position k of pair j. A pair spans at most P slots, so attention runs on
  blocks of P queries against their own and the previous block, masked to the same pair and
  causally. A piece needing more than `length` slots gets NaN, never a silent truncation.
  """
  b, k, p = targets.shape
  if length % p:
    raise ValueError(f"packed length {length} is not a multiple of the patch size {p}")
  steps = _pair_steps(targets, valid)
  ends = jnp.cumsum(steps, axis=-1)
  slots = jnp.arange(length)
  pair = jax.vmap(lambda e: jnp.searchsorted(e, slots, side="right"))(ends)
  pair = jnp.minimum(pair, k - 1)
  position = slots - jnp.take_along_axis(ends - steps, pair, axis=-1)
  in_use = slots < ends[:, -1:]
  chars = jnp.take_along_axis(targets, pair[..., None], axis=1)  # [B, length, P]
  label = jnp.take_along_axis(chars, position[..., None].clip(0, p - 1), axis=-1)[..., 0]
  previous = jnp.take_along_axis(chars, (position[..., None] - 1).clip(0, p - 1), axis=-1)[..., 0]
  position = jnp.where(in_use, position, 0)
  # Each pair's patch output goes to its first slot: a scatter of distinct rows (pairs with no
  # slot are dropped), whose gradient is a gather of K rows.
  starts = jnp.where(steps > 0, ends - steps, length)
  first = jnp.zeros((b, length, encoded.shape[-1]), encoded.dtype)
  first = first.at[jnp.arange(b)[:, None], starts].set(encoded, mode="drop", unique_indices=True)
  x = sharding.constrain_batch(char.embed(first, previous, position))
  key_valid = in_use & ((previous != 0) | (position == 0))
  segment = jnp.where(key_valid, pair, -1)
  q_seg = segment.reshape(-1, p)
  k_seg = _local_keys(segment, p, fill=-1)
  q_pos = position.reshape(-1, p)
  k_pos = _local_keys(position, p)
  mask = ((q_seg[:, :, None] == k_seg[:, None, :]) & (k_pos[:, None, :] <= q_pos[:, :, None])
          & (k_seg[:, None, :] >= 0))[:, None]
  logprobs = char(x, mask, deterministic=deterministic, rngs=rngs, local_block=p)
  picked = jnp.where(in_use & (label != 0), _pick(logprobs, label), 0.0)
  rows = jnp.arange(b)[:, None]
  out = jnp.zeros((b, k, p), jnp.float32).at[rows, pair, position].add(picked)
  overflow = ends[:, -1] > length
  return jnp.where(overflow[:, None, None], jnp.nan, out)


def forward(model: NotaGen, patches: jax.Array, mask: jax.Array, *, deterministic: bool = True,
            rngs: nnx.Rngs | None = None, packed_len: int | None = None) -> Output:
  """The training / scoring pass. patches [B, L, P] int32, mask [B, L] (1 = real patch).

  Pieces are right-padded; pair i (patch i's output -> patch i+1's chars) counts when both patches
  are real. While training (`deterministic=False`) `rngs` needs a 'dropout' stream, and a
  'sampling' stream when `cfg.patch_sampling` is set. With `cfg.char_packing`, `packed_len` is the
  static packed row length (see `packed_length`); None means every pair at full length (always
  enough, saves nothing).
  """
  cfg = model.cfg
  patches = patches.astype(jnp.int32)
  hidden = sharding.constrain_batch(model.patch(patches, mask, deterministic=deterministic,
                                                rngs=rngs))
  b, length, p = patches.shape
  encoded, targets, valid = hidden[:, :-1], patches[:, 1:], _pair_valid(mask)
  sampled = cfg.patch_sampling and not deterministic and cfg.patch_sampling < length - 1
  if sampled:
    # K random real pairs per piece: top-k of random scores, invalid pairs ranked last.
    scores = jax.random.uniform(rngs.sampling(), valid.shape) + valid
    _, index = jax.lax.top_k(scores, cfg.patch_sampling)
    index = jnp.sort(index, axis=-1)
    pick = lambda a: jnp.take_along_axis(a, index.reshape(b, -1, *([1] * (a.ndim - 2))), axis=1)
    encoded, targets, valid = pick(encoded), pick(targets), pick(valid)
  if cfg.char_packing:
    logprob = _packed_logprob(model.char, encoded, targets, valid,
                              packed_len or targets.shape[1] * p, deterministic, rngs)
  else:
    logprob = _unpacked_logprob(model.char, encoded, targets, deterministic, rngs)
  char_mask = ((targets != 0) & valid[..., None]).astype(jnp.float32)
  logprob = logprob * char_mask
  if sampled:
    rows = jnp.arange(b)[:, None]
    logprob = jnp.zeros((b, length - 1, p), jnp.float32).at[rows, index].set(logprob)
    char_mask = jnp.zeros((b, length - 1, p), jnp.float32).at[rows, index].set(char_mask)
  return Output(char_logprob=logprob, char_mask=char_mask, hidden=hidden)


def next_char_probs(model: NotaGen, patches: jax.Array, mask: jax.Array,
                    prefix: jax.Array | None = None) -> jax.Array:
  """[B, V] distribution of the next char after each piece's last real patch and `prefix` [B, T].

  With no prefix this is the first character of the next patch (the original's generate step).
  """
  hidden = model.patch(patches.astype(jnp.int32), mask, deterministic=True, rngs=None)
  last = jnp.sum(mask.astype(jnp.int32), axis=1) - 1
  encoded = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
  b = patches.shape[0]
  chars = jnp.zeros((b, 0), jnp.int32) if prefix is None else prefix.astype(jnp.int32)
  inputs = jnp.pad(chars, [(0, 0), (1, 0)])
  positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
  x = model.char.embed(encoded, inputs, positions)
  t = inputs.shape[1]
  logprobs = model.char(x, _causal(t)[None, None], deterministic=True, rngs=None)
  return jnp.exp(logprobs[:, -1])
