"""The sampler's layout: how the model's weights and KV caches are kept to generate on the
devices that hold the weights."""

from __future__ import annotations

from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
from flax import nnx

from notagen_jax import model as model_lib
from notagen_jax.inference import cpu_kernels
from notagen_jax.inference import kv_cache
from notagen_jax.inference import weights


class Layout(NamedTuple):
  params: nnx.State  # read at every generated patch
  prefill_params: nnx.State  # read when prompts are encoded
  cache: type[model_lib.KVCache]


def _on_cpu(params: nnx.State) -> bool:
  return all(device.platform == "cpu" for leaf in jax.tree.leaves(params)
             for device in leaf.devices())


def for_sampling(params: nnx.State, cfg: model_lib.ModelConfig, dtype: str | None,
                 rows: int) -> Layout:
  """params with the blocks' matrices stored in `dtype` (`weights.store`), for `rows` rows.

  With float32 activations on a CPU with `cpu_kernels` built, float32 matrices are kept in column
  blocks and the caches attend with the kernel; narrower matrices take their kernels at up to
  `cpu_kernels.MAX_ROWS` rows. int8 matrices that no kernel multiplies are dequantized at every
  step, which is logged: bfloat16 ones are then faster.
  """
  params = weights.store(params, dtype)
  kernels = (jnp.dtype(cfg.dtype) == jnp.float32 and _on_cpu(params) and
             cpu_kernels.available())
  if kernels:
    params = weights.in_column_blocks(params)
  if dtype == "int8" and not (kernels and rows <= cpu_kernels.MAX_ROWS):
    reason = (f"{rows} rows, above the int8 kernel's {cpu_kernels.MAX_ROWS}" if kernels else
              "the int8 kernel needs float32 activations on a CPU with cpu_kernels built")
    logging.warning("int8 weights are dequantized to bfloat16 at every step (%s): bfloat16 "
                    "weights are faster", reason)
  return Layout(params, weights.dequantized_patch_decoder(params),
                kv_cache.KernelKVCache if kernels else model_lib.KVCache)
