"""Losses as pure functions: NLL and bits per char, and the DPO family on summed log-probs.

The DPO losses take per-pair sequence log-probs ([N] arrays: policy and reference, chosen and
rejected), average over pairs and return (loss, metrics).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def nll(logprob: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean negative log-likelihood over the positions where mask is set."""
  if mask is None:
    return -jnp.mean(logprob)
  mask = mask.astype(logprob.dtype)
  return -jnp.sum(logprob * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def bits_per_char(mean_nll: jax.Array) -> jax.Array:
  """A mean NLL in nats converted to bits."""
  return mean_nll / math.log(2.0)


def _metrics(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, beta: float) -> dict[str, jax.Array]:
  chosen = beta * (policy_chosen - ref_chosen)
  rejected = beta * (policy_rejected - ref_rejected)
  return {"rewards/chosen": jnp.mean(chosen), "rewards/rejected": jnp.mean(rejected),
          "rewards/margin": jnp.mean(chosen - rejected),
          "rewards/accuracy": jnp.mean((chosen > rejected).astype(jnp.float32))}


def _log_ratio_gap(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> jax.Array:
  return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def dpo(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
        ref_rejected: jax.Array, beta: float = 0.1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sigmoid DPO: -log sigmoid(beta * d), d the gap of policy and reference log-ratios."""
  d = _log_ratio_gap(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
  loss = -jnp.mean(jax.nn.log_sigmoid(beta * d))
  return loss, _metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def dpo_positive(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
                 ref_rejected: jax.Array, beta: float = 0.1,
                 lam: float = 10.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPO-Positive (CLaMP-DPO's loss): DPO with a penalty when the chosen log-prob falls below ref.

  loss = -log sigmoid(beta * (d - lam * max(0, ref_chosen - policy_chosen))).
  """
  d = _log_ratio_gap(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
  penalty = jnp.maximum(0.0, ref_chosen - policy_chosen)
  loss = -jnp.mean(jax.nn.log_sigmoid(beta * (d - lam * penalty)))
  metrics = _metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
  metrics["penalty"] = jnp.mean(penalty)
  return loss, metrics


def ipo(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
        ref_rejected: jax.Array, beta: float = 0.1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """IPO: the squared distance of d from 1 / (2 beta)."""
  d = _log_ratio_gap(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
  loss = jnp.mean(jnp.square(d - 1.0 / (2.0 * beta)))
  return loss, _metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
