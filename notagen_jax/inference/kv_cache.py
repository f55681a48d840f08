"""The sampler's KV cache on a CPU: a generation step attends with `cpu_kernels.attention`."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from notagen_jax import model as model_lib
from notagen_jax.inference import cpu_kernels


@flax.struct.dataclass
class KernelKVCache(model_lib.KVCache):
  """A `model.KVCache` whose one-query float32 steps take `cpu_kernels.attention` on a CPU.

  The kernel reads only the filled part of the cache: XLA's attention reads every slot of the
  capacity (a 565-patch context in a 1024-slot cache read 1.8x the bytes needed at every patch).
  """

  def attend(self, q: jax.Array, start: jax.Array) -> jax.Array:
    if (q.shape[2] == 1 and q.dtype == self.k.dtype == self.v.dtype == jnp.float32 and
        cpu_kernels.available()):
      return jax.lax.platform_dependent(q, self.k, self.v, start, cpu=cpu_kernels.attention,
                                        default=model_lib.cached_attention)
    return super().attend(q, start)
