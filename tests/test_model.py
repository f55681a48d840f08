"""The JAX model against the original's golden numbers and the PyTorch reference."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_reference
from notagen_jax import checkpoint
from notagen_jax import config as config_lib
from notagen_jax import fusion
from notagen_jax import model as model_lib
from notagen_jax import sharding
from notagen_jax import torch_port
from notagen_jax import trainer

forward = nnx.jit(model_lib.forward, static_argnames=("deterministic", "packed_len"))
next_char_probs = nnx.jit(model_lib.next_char_probs)


@pytest.fixture(scope="module")
def cases(golden_dir):
  return json.loads((golden_dir / "cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def state_dict(golden_dir):
  return torch_port.load_state_dict(golden_dir / "tiny.pth")


@pytest.fixture(scope="module")
def tiny(golden_dir):
  return checkpoint.load_model(golden_dir / "tiny.pth")


# A per-patch log-prob sums 16 float32 char log-probs: a few ulps of its magnitude.
PER_PATCH_TOLERANCE = dict(rtol=3e-6, atol=1e-5)


def _one(case):
  patches = np.asarray(case["patch_ids"], np.int32)[None]
  return patches, np.ones(patches.shape[:2], np.int32)


def _batch(cases):
  """The golden pieces right-padded into one batch."""
  length = max(c["n_patches"] for c in cases)
  patches = np.zeros((len(cases), length, 16), np.int32)
  mask = np.zeros((len(cases), length), np.int32)
  for i, c in enumerate(cases):
    patches[i, :c["n_patches"]] = c["patch_ids"]
    mask[i, :c["n_patches"]] = 1
  return patches, mask


@pytest.fixture(scope="module")
def batch_out(tiny, cases):
  """The golden pieces right-padded into one batch: outputs and next-char probabilities."""
  patches, mask = _batch(cases)
  return forward(tiny, patches, mask), next_char_probs(tiny, patches, mask)


def test_golden_parity_unpadded(tiny, cases):
  case = cases[0]
  patches, mask = _one(case)
  out = forward(tiny, patches, mask)
  # Float32 rounding only (measured on these pieces: 3e-7 relative on the loss and sums, per-patch
  # log-probs within 2.3e-5 of values up to 81, hidden states within 6e-7, next-char
  # probabilities within 7e-9); the bounds leave about ten times that.
  np.testing.assert_allclose(out.loss, case["loss"], rtol=2e-6)
  np.testing.assert_allclose(out.sum_logprob[0], case["sum_char_logprob"], rtol=2e-6)
  assert int(out.n_chars[0]) == case["n_target_chars"]
  np.testing.assert_allclose(out.patch_logprob[0], case["per_target_patch_logprob"],
                             **PER_PATCH_TOLERANCE)
  np.testing.assert_allclose(out.hidden[0, 0, :8], case["patch_hidden_first_patch_first8"],
                             atol=5e-6)
  np.testing.assert_allclose(out.hidden[0, -1, :8], case["patch_hidden_last_patch_first8"],
                             atol=5e-6)
  probs = next_char_probs(tiny, patches, mask)
  np.testing.assert_allclose(probs[0], case["generate_next_char_probs_after_piece"], atol=1e-7)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_golden_parity_padded_batch(batch_out, cases, index):
  """Each piece of a right-padded batch gives the original's numbers for that piece alone."""
  out, probs = batch_out
  case = cases[index]
  n = case["n_patches"]
  assert int(out.n_chars[index]) == case["n_target_chars"]
  np.testing.assert_allclose(-out.sum_logprob[index] / out.n_chars[index], case["loss"], rtol=2e-6)
  np.testing.assert_allclose(out.sum_logprob[index], case["sum_char_logprob"], rtol=2e-6)
  np.testing.assert_allclose(out.patch_logprob[index, :n - 1], case["per_target_patch_logprob"],
                             **PER_PATCH_TOLERANCE)
  assert not np.any(out.char_mask[index, n - 1:])
  np.testing.assert_allclose(out.hidden[index, 0, :8], case["patch_hidden_first_patch_first8"],
                             atol=5e-6)
  np.testing.assert_allclose(out.hidden[index, n - 1, :8],
                             case["patch_hidden_last_patch_first8"], atol=5e-6)
  np.testing.assert_allclose(probs[index], case["generate_next_char_probs_after_piece"],
                             atol=1e-7)


def test_batch_loss_is_mean_over_all_chars(batch_out, cases):
  total = sum(c["n_target_chars"] for c in cases)
  expected = -sum(c["sum_char_logprob"] for c in cases) / total
  np.testing.assert_allclose(batch_out[0].loss, expected, rtol=2e-6)


def test_sharpened_weights_match_torch_reference(state_dict, cases):
  # Larger, noisier weights make the distributions peaked, where small numerical slips show.
  rng = np.random.default_rng(0)
  sharp = {k: (3.0 * v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
           for k, v in state_dict.items() if k != torch_port.LM_HEAD}
  sharp[torch_port.LM_HEAD] = sharp[torch_port.CHAR_WTE]
  reference = torch_reference.from_state_dict({k: torch.from_numpy(v) for k, v in sharp.items()})
  cfg, params = torch_port.params_from_state_dict(sharp)
  model = checkpoint.build(cfg, params)
  patches, mask = _one(cases[1])
  with torch.no_grad():
    expected = reference(torch.from_numpy(patches).long(), torch.from_numpy(mask).long())
    expected_probs = reference.next_char_probs(torch.from_numpy(patches).long())
  out = forward(model, patches, mask)
  assert float(out.loss) > 7.0  # really sharpened: far from the uniform 4.85 nats (7.75 here)
  # Float32 rounding only, as on the golden weights; the values are larger (per-patch log-probs
  # up to 150, measured within 6.1e-5; hidden states up to 12.6, within 3.2e-5).
  np.testing.assert_allclose(out.loss, expected["loss"].item(), rtol=2e-6)
  np.testing.assert_allclose(out.sum_logprob[0], expected["sum_logprob"].item(), rtol=2e-6)
  np.testing.assert_allclose(out.patch_logprob[0], expected["per_patch_logprob"].numpy(),
                             **PER_PATCH_TOLERANCE)
  np.testing.assert_allclose(out.hidden[0], expected["hidden"][0].numpy(), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(next_char_probs(model, patches, mask)[0],
                             expected_probs[0].numpy(), atol=5e-6)


def test_bfloat16_compute_close_to_float32(golden_dir, cases):
  model = checkpoint.load_model(golden_dir / "tiny.pth", dtype="bfloat16")
  patches, mask = _batch(cases)
  out = forward(model, patches, mask)
  # bf16 keeps 8 mantissa bits; LayerNorm, softmax and the head's accumulation stay float32.
  # Measured on these pieces: 1.7e-5 relative on the loss, at most 2.9e-5 on a piece's sum.
  total = sum(c["n_target_chars"] for c in cases)
  np.testing.assert_allclose(out.loss, -sum(c["sum_char_logprob"] for c in cases) / total,
                             rtol=1e-4)
  for i, case in enumerate(cases):
    np.testing.assert_allclose(out.sum_logprob[i], case["sum_char_logprob"], rtol=2e-4)


def test_char_packing_matches_unpacked(golden_dir, batch_out, cases):
  packed = checkpoint.load_model(golden_dir / "tiny.pth", char_packing=True)
  patches, mask = _batch(cases)
  length = model_lib.packed_length(patches, mask)
  assert length < (patches.shape[1] - 1) * 16 * 0.8  # the pad characters really are skipped
  out = batch_out[0]
  out_packed = forward(packed, patches, mask, packed_len=length)
  np.testing.assert_allclose(out_packed.loss, out.loss, rtol=1e-6)
  np.testing.assert_allclose(out_packed.sum_logprob, out.sum_logprob, rtol=1e-6)
  np.testing.assert_allclose(out_packed.char_logprob, out.char_logprob, atol=1e-5)
  np.testing.assert_array_equal(out_packed.char_mask, out.char_mask)
  # Too short a packed row is an error (NaN), never a silent truncation.
  assert np.isnan(forward(packed, patches, mask, packed_len=length - 64).loss)


def test_char_packing_gradients_match(golden_dir, tiny, cases):
  packed = checkpoint.load_model(golden_dir / "tiny.pth", char_packing=True)
  patches, mask = _batch(cases[1:])
  patches, mask = patches[:, :80], mask[:, :80]  # short: this test is about the packed layout
  length = model_lib.packed_length(patches, mask)
  grad = nnx.jit(nnx.grad(lambda m, n: model_lib.forward(m, patches, mask, packed_len=n).loss),
                 static_argnums=1)
  expected = nnx.to_pure_dict(nnx.state(grad(tiny, None), nnx.Param))
  actual = nnx.to_pure_dict(nnx.state(grad(packed, length), nnx.Param))
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6),
               actual, expected)


def test_next_char_probs_with_prefix_match_forward(tiny, cases):
  patches, mask = _one(cases[2])
  out = forward(tiny, patches, mask)
  # Predict char 5 of the last patch from the piece before it and that patch's first 4 chars.
  n = cases[2]["n_patches"]
  prefix = patches[:, n - 1, :4]
  probs = next_char_probs(tiny, patches[:, :n - 1], mask[:, :n - 1], prefix)
  target = patches[0, n - 1, 4]
  np.testing.assert_allclose(np.log(probs[0, target]), out.char_logprob[0, n - 2, 4], atol=1e-5)


def test_patch_sampling_and_remat(golden_dir, cases):
  patches, mask = _batch(cases)
  patches, mask = patches[:, :64], mask[:, :64]  # every piece is longer: all 64 real
  # No dropout, so that remat's gradients can be compared exactly; sampling still draws.
  over = {"patch_sampling": 24, "dropout": 0.0}
  model = checkpoint.load_model(golden_dir / "tiny.pth", **over)
  remat = checkpoint.load_model(golden_dir / "tiny.pth", remat=True, **over)

  def loss_fn(m, rngs):
    out = model_lib.forward(m, patches, mask, deterministic=False, rngs=rngs)
    return out.loss, out.char_mask

  grad_fn = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))
  (loss, char_mask), grads = grad_fn(model, nnx.Rngs(sampling=2))
  (loss_remat, _), grads_remat = grad_fn(remat, nnx.Rngs(sampling=2))
  # Exactly K real target patches per piece went through the char decoder.
  np.testing.assert_array_equal(np.asarray(char_mask).any(-1).sum(-1), [24, 24, 24])
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               nnx.to_pure_dict(nnx.state(grads_remat, nnx.Param)),
               nnx.to_pure_dict(nnx.state(grads, nnx.Param)))
  # Sampling is training-only: the deterministic pass scores every pair.
  out = forward(model, patches, mask)
  assert int(out.n_chars.sum()) == int((patches[:, 1:] != 0).sum())


def test_dropout_only_while_training(tiny, cases):
  patches, mask = _batch(cases)
  patches, mask = patches[:, :64], mask[:, :64]
  train = nnx.jit(lambda m, rngs: model_lib.forward(m, patches, mask, deterministic=False,
                                                    rngs=rngs).loss)
  first, second = train(tiny, nnx.Rngs(dropout=1)), train(tiny, nnx.Rngs(dropout=2))
  assert np.isfinite(first) and first != second
  evaluated = forward(tiny, patches, mask).loss
  np.testing.assert_allclose(forward(tiny, patches, mask).loss, evaluated, rtol=0)
  # Dropout 0.1 moves this tiny model's loss by a little (measured over 20 keys: at most 0.008).
  assert abs(float(first) - float(evaluated)) < 0.03


def test_manual_attention_matches_dot_product_attention():
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (2, 7, 2, 64)) for key in keys)
  mask = jnp.tril(jnp.ones((7, 7), bool))[None, None] & (jnp.arange(7) < 5)[None, None, None]
  expected = model_lib.attention(q, k, v, mask, model_lib.Dropout(0.1), True, None)
  # A rate so small that nothing is dropped exercises the explicit path.
  explicit = jax.jit(lambda q, k, v: model_lib.attention(q, k, v, mask, model_lib.Dropout(1e-12),
                                                         False, nnx.Rngs(dropout=0)))
  actual = explicit(q, k, v)
  np.testing.assert_allclose(actual, expected, atol=1e-6)


def test_dropout_rate_and_scale():
  drop = model_lib.Dropout(0.1)
  x = jnp.ones((1000, 1000))
  y = np.asarray(jax.jit(lambda x: drop(x, deterministic=False, rngs=nnx.Rngs(dropout=0)))(x))
  assert abs((y == 0).mean() - 0.1) < 2e-3
  kept = y[y != 0]
  np.testing.assert_allclose(kept, 65536 / (65536 - 6554), rtol=1e-6)
  assert abs(y.mean() - 1.0) < 3e-3
  assert drop(x, deterministic=True, rngs=None) is x


def _reference_layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + model_lib.LN_EPS) * scale + bias


def test_layer_norm_gradient_equals_autodiff():
  keys = jax.random.split(jax.random.key(0), 4)
  x = 3 * jax.random.normal(keys[0], (2, 5, 64)) + 1
  scale, bias = jax.random.normal(keys[1], (64,)), jax.random.normal(keys[2], (64,))
  weights = jax.random.normal(keys[3], x.shape)

  def grads(norm):
    loss = lambda x, s, b: jnp.sum(jnp.sin(norm(x, s, b)) * weights)
    return jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)

  np.testing.assert_allclose(model_lib.layer_norm(x, scale, bias),
                             _reference_layer_norm(x, scale, bias), atol=1e-6)
  for actual, expected in zip(grads(model_lib.layer_norm), grads(_reference_layer_norm)):
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_materialized_grad_is_the_identity():
  x = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
  f = lambda x: jnp.sum(jnp.tanh(3 * x) ** 2)
  g = jax.jit(jax.grad(lambda x: f(fusion.materialized_grad(x))))
  np.testing.assert_array_equal(fusion.materialized_grad(x), x)
  np.testing.assert_allclose(g(x), jax.jit(jax.grad(f))(x), rtol=1e-5, atol=1e-6)


def test_every_parameter_has_logical_axes():
  cfg = model_lib.config_for("tiny")
  model = nnx.eval_shape(lambda: model_lib.NotaGen(cfg, nnx.Rngs(0)))
  names = {"vocab", "embed", "mlp", "heads", "kv", "patch_in", "position", None}
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = param.get_metadata()["out_sharding"]
    assert len(axes) == len(param.shape), path
    assert set(axes) <= names, path
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert specs["patch"]["blocks"][0]["qkv"].get_value() == jax.sharding.PartitionSpec(
      "embed", None, "heads", "kv")


def test_presets():
  assert model_lib.config_for("small").heads == 12
  assert model_lib.config_for("tiny").heads == 2
  large = model_lib.config_for((1024, 20, 6, 1280), dtype="bfloat16")
  assert large == dataclasses.replace(model_lib.config_for("large"), dtype="bfloat16")
  assert model_lib.ModelConfig.from_json(large.to_json()) == large
  with pytest.raises(ValueError, match="multiple of the head size"):
    model_lib.ModelConfig(hidden=100)


def _scan_pair(**overrides):
  """A random 3+2-layer model, unrolled and with `scan_layers`, holding the same weights."""
  cfg = model_lib.config_for((32, 3, 2, 64), **overrides)
  unrolled = model_lib.create(cfg, seed=1)
  params = nnx.to_pure_dict(nnx.state(unrolled))
  return unrolled, checkpoint.build(dataclasses.replace(cfg, scan_layers=True), params)


def _random_batch(rows=3, length=24):
  rng = np.random.default_rng(0)
  patches = rng.integers(1, 128, (rows, length, 16)).astype(np.int32)
  patches[:, :, 12:] *= rng.random((rows, length, 1)) < 0.5  # some patches end in pad chars
  mask = np.ones((rows, length), np.int32)
  mask[1, length // 2:] = 0
  patches[1, length // 2:] = 0
  return patches, mask


@pytest.mark.slow  # a minute or more: runs in CI's second pass
@pytest.mark.parametrize("overrides", [{"patch_sampling": 9},
                                       {"char_packing": True, "remat": True}])
def test_scan_layers_same_numbers(overrides):
  """Scanned layers give the unrolled model's outputs, loss and gradients, dropout included: the
  layers draw the same dropout keys."""
  unrolled, scanned = _scan_pair(dropout=0.1, **overrides)
  patches, mask = _random_batch()

  def loss_fn(m, rngs):
    out = model_lib.forward(m, patches, mask, deterministic=False, rngs=rngs)
    return out.loss, out

  grad_fn = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))
  (loss, out), grads = grad_fn(unrolled, nnx.Rngs(dropout=3, sampling=4))
  (scan_loss, scan_out), scan_grads = grad_fn(scanned, nnx.Rngs(dropout=3, sampling=4))
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(scan_out.char_logprob, out.char_logprob, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(scan_out.hidden, out.hidden, rtol=1e-6, atol=1e-6)
  grads, scan_grads = (nnx.to_pure_dict(nnx.state(g, nnx.Param)) for g in (grads, scan_grads))
  assert jax.tree.structure(scan_grads) == jax.tree.structure(grads)  # per-layer, as the params
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7),
               scan_grads, grads)


def test_scan_layers_same_numbers_deterministic():
  unrolled, scanned = _scan_pair()
  patches, mask = _random_batch()
  np.testing.assert_allclose(forward(scanned, patches, mask).char_logprob,
                             forward(unrolled, patches, mask).char_logprob, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(next_char_probs(scanned, patches, mask, patches[:, 5, :3]),
                             next_char_probs(unrolled, patches, mask, patches[:, 5, :3]),
                             atol=1e-7)


def test_scan_layers_checkpoints_are_per_layer(tmp_path):
  """A checkpoint saved with scanned layers restores unrolled and the other way round, and both
  port to the same torch state dict."""
  unrolled, scanned = _scan_pair()
  assert (jax.tree.structure(nnx.to_pure_dict(nnx.state(scanned))) ==
          jax.tree.structure(nnx.to_pure_dict(nnx.state(unrolled))))
  checkpoint.save_params(tmp_path / "scanned", scanned)
  checkpoint.save_params(tmp_path / "unrolled", unrolled)
  expected = checkpoint.export_state_dict(unrolled)
  for saved, scan_layers in (("scanned", False), ("unrolled", True), ("scanned", True)):
    restored = checkpoint.restore_params(tmp_path / saved, scan_layers=scan_layers)
    assert restored.cfg.scan_layers == scan_layers
    exported = checkpoint.export_state_dict(restored)
    assert list(exported) == list(expected)
    for key, value in expected.items():
      np.testing.assert_array_equal(exported[key], value)
  exported = checkpoint.export_state_dict(scanned)
  for key, value in expected.items():
    np.testing.assert_array_equal(exported[key], value)


def test_stacked_layers_have_a_replicated_layers_axis():
  cfg = model_lib.config_for((32, 3, 2, 128))
  stacked = nnx.eval_shape(
      lambda: model_lib.stack_layers(model_lib.NotaGen(cfg, nnx.Rngs(0)).patch.blocks))
  assert stacked.qkv.shape == (3, 128, 3, 2, 64)  # [layers, H, q/k/v, heads, head size]
  specs = nnx.get_partition_spec(nnx.state(stacked, nnx.Param))
  assert specs["qkv"].get_value() == jax.sharding.PartitionSpec(
      "layers", "embed", None, "heads", "kv")
  assert specs["ln_1"]["scale"].get_value() == jax.sharding.PartitionSpec("layers", "embed")
  mesh = sharding.make_mesh((1, 4, 2), jax.devices())
  shardings = sharding.state_shardings(nnx.state(stacked, nnx.Param), mesh,
                                       sharding.DEFAULT_RULES)
  assert shardings["qkv"].get_value().spec == jax.sharding.PartitionSpec(
      None, "fsdp", None, "tensor", None)
  assert shardings["fc"].get_value().spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


@pytest.mark.slow  # a minute or more: runs in CI's second pass
def test_scan_layers_sharded_train_step():
  """The trainer's jitted step on a (2, 2, 2) mesh of 8 CPU devices, dropout on: scanned layers
  give the unrolled run's loss, gradient norm and updated params."""
  assert jax.device_count() == 8
  patches, mask = _random_batch(rows=8, length=32)
  batch = {"patches": patches, "masks": mask}
  results = []
  for scan_layers in (False, True):
    c = config_lib.base_config("pretrain", "tiny")
    c.model.update(patch_length=32, scan_layers=scan_layers)
    c.mesh.shape = (2, 2, 2)
    c.optimizer.warmup_steps = 0
    setup = trainer.build_setup(c)
    assert setup.model_cfg.scan_layers == scan_layers
    state, metrics = trainer.make_train_step(setup)(
        setup.state, None, sharding.global_batch(batch, setup.mesh))
    results.append((jax.tree.map(np.asarray, nnx.to_pure_dict(state.params)),
                    {k: float(metrics[k]) for k in ("loss", "grad_norm")}))
  (params, metrics), (scan_params, scan_metrics) = results
  assert scan_metrics == pytest.approx(metrics, rel=1e-5)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
               scan_params, params)
