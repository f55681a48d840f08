"""What XLA must compute once: a value its fusion would otherwise recompute in each consumer.

Like `checkpoint_name`, these change what is stored, never the numbers. XLA's CPU fusion
duplicates element-wise chains into every consumer, and its pipeline drops optimization barriers
before fusion, so on a CPU a value is stored by a branch it cannot resolve at compile time. Other
platforms keep the value as is (chosen when the program is lowered for them, whatever the host
traces it): their fusion does not recompute this way, and a branch there waits for the device.
"""

import jax
import jax.numpy as jnp


def _materialize(x: jax.Array) -> jax.Array:
  def stored(x):
    # One element's bits with the sign cleared are never all ones: a branch never taken.
    probe = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.uint32)
    return jax.lax.cond(probe & 0x7FFFFFFF != jnp.uint32(0xFFFFFFFF), lambda x: x,
                        lambda x: x * 1, x)

  return jax.lax.platform_dependent(x, cpu=stored, default=lambda x: x)


@jax.custom_vjp
def materialized_grad(x: jax.Array) -> jax.Array:
  """The identity, whose gradient is computed once and stored.

  On the residual stream: without it XLA's CPU fusion recomputes the stream's gradient, an
  element-wise chain through every later block's LayerNorm, inside each of its consumers (the
  transposes feeding the weight gradients): quadratic in depth.
  """
  return x


def _materialized_grad_fwd(x):
  return x, None


def _materialized_grad_bwd(_, g):
  return (_materialize(g),)


materialized_grad.defvjp(_materialized_grad_fwd, _materialized_grad_bwd)
