"""Losses against values computed by hand."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from notagen_jax import losses

# Two pairs: (policy chosen, policy rejected, ref chosen, ref rejected).
PAIRS = np.array([[-100.0, -120.0, -105.0, -118.0],
                  [-50.0, -40.0, -48.0, -45.0]], np.float32)


def _logsig(x):
  return -math.log1p(math.exp(-x))


def _args():
  return tuple(jnp.asarray(PAIRS[:, i]) for i in range(4))


def test_nll_and_bits_per_char():
  logprob = jnp.array([[-1.0, -2.0, -9.0], [-3.0, -5.0, -7.0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(losses.nll(logprob, mask), 2.0)
  np.testing.assert_allclose(losses.nll(logprob), 27.0 / 6)
  np.testing.assert_allclose(losses.nll(logprob, jnp.zeros_like(mask)), 0.0)
  np.testing.assert_allclose(losses.bits_per_char(jnp.float32(math.log(2.0) * 3)), 3.0, rtol=1e-6)


def test_dpo_positive_by_hand():
  loss, metrics = losses.dpo_positive(*_args(), beta=0.1, lam=10.0)
  # Pair 1: d = (-100 + 120) - (-105 + 118) = 7; chosen above ref, no penalty.
  # Pair 2: d = (-50 + 40) - (-48 + 45) = -7; penalty max(0, -48 + 50) = 2.
  expected = -(_logsig(0.1 * 7) + _logsig(0.1 * (-7 - 10 * 2))) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # Rewards: beta * (policy - ref).
  np.testing.assert_allclose(metrics["rewards/chosen"], (0.5 - 0.2) / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/rejected"], (-0.2 + 0.5) / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/margin"], (0.7 - 0.7) / 2, atol=1e-6)
  np.testing.assert_allclose(metrics["rewards/accuracy"], 0.5)
  np.testing.assert_allclose(metrics["penalty"], 1.0)


def test_dpo_positive_without_penalty_is_dpo():
  args = _args()
  no_penalty, _ = losses.dpo_positive(*args, beta=0.1, lam=0.0)
  plain, _ = losses.dpo(*args, beta=0.1)
  np.testing.assert_allclose(no_penalty, plain, rtol=1e-6)
  np.testing.assert_allclose(plain, -(_logsig(0.7) + _logsig(-0.7)) / 2, rtol=1e-6)


def test_ipo_by_hand():
  loss, metrics = losses.ipo(*_args(), beta=0.1)
  np.testing.assert_allclose(loss, ((7 - 5) ** 2 + (-7 - 5) ** 2) / 2, rtol=1e-6)
  assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margin",
                          "rewards/accuracy"}


@pytest.mark.parametrize("fn", [losses.dpo, losses.dpo_positive, losses.ipo])
def test_identical_policy_and_reference(fn):
  chosen, rejected = jnp.array([-10.0, -20.0]), jnp.array([-15.0, -12.0])
  loss, metrics = fn(chosen, rejected, chosen, rejected)
  expected = 0.25 / 0.01 if fn is losses.ipo else math.log(2.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["rewards/margin"], 0.0)
