import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from notagen_jax import checkpoint
from notagen_jax import model as model_lib
from notagen_jax import sampling
from notagen_jax.inference import cpu_kernels
from notagen_jax.inference import kv_cache
from notagen_jax.inference import weights


@pytest.fixture(scope="module")
def kernel():
  if not cpu_kernels.available():  # a failure, not a skip: these tests are what checks them
    pytest.fail(f"cpu_kernels not built: {cpu_kernels._load()}")


def _widened_product(x, w):
  return np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("x_shape,n", [((1, 768), 2304), ((2, 3072), 768), ((1, 1, 768), 768),
                                       ((3, 13), 5), ((1, 4), 1)])
def test_kernel_equals_float64_product_of_widened_weights(kernel, x_shape, n):
  rng = np.random.default_rng(n)
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = jnp.asarray(rng.standard_normal((x_shape[-1], n)), jnp.bfloat16)
  got = jax.jit(cpu_kernels.matmul)(x, w)
  assert got.shape == x_shape[:-1] + (n,) and got.dtype == jnp.float32
  expected = _widened_product(x, w)
  # float32 sums of K products: error grows like sqrt(K) ulps of the largest partial sum.
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.sqrt(x_shape[-1]) *
                             np.abs(expected).max())


def test_int8_weight_rounds_each_block_to_its_largest_over_127():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((2, 32, 2, 16)).astype(np.float32)  # K = 2 x 32 over two input axes
  w[0, :, 0, 0] = 0.0  # an all-zero block keeps a usable scale
  q = weights.Int8Weight.quantize(jnp.asarray(w), input_axes=2)
  matrix = w.reshape(64, 32)
  integers = np.asarray(q.integers())
  assert q.values.shape == (8, 2, 8, 16) and q.values.dtype == jnp.int8
  assert integers.shape == (64, 32) and q.scales.shape == (2, 32) and q.matrix_shape == (64, 32)
  np.testing.assert_allclose(q.scales[1], np.abs(matrix[32:]).max(0) / 127, rtol=1e-6)
  assert np.abs(integers).max() == 127
  assert q.scales[0, 0] == 1.0 and not np.any(integers[:32, 0])
  error = np.abs(np.asarray(q.matrix(jnp.float32)) - matrix)
  assert np.all(error <= np.repeat(np.asarray(q.scales), 32, axis=0) / 2 * (1 + 1e-6))
  np.testing.assert_array_equal(q.astype(jnp.float32),
                                np.asarray(q.matrix(jnp.float32)).reshape(w.shape))
  with pytest.raises(ValueError, match="divisible by 32"):
    weights.Int8Weight.quantize(jnp.ones((48, 16)), input_axes=1)
  with pytest.raises(ValueError, match="divisible by 16"):
    weights.Int8Weight.quantize(jnp.ones((32, 4)), input_axes=1)


def test_int8_tiles_hold_8_rows_by_16_columns_in_order():
  matrix = np.arange(32 * 48).reshape(32, 48)
  tiles = np.asarray(cpu_kernels.tile(jnp.asarray(matrix)))
  assert tiles.shape == (4, 3, 8, 16)
  np.testing.assert_array_equal(tiles[1, 2], matrix[8:16, 32:48])
  np.testing.assert_array_equal(cpu_kernels.untile(tiles), matrix)


@pytest.mark.parametrize("x_shape,n", [((1, 768), 2304), ((3, 3072), 768), ((1, 1, 64), 48)])
def test_int8_kernel_equals_float64_product_of_dequantized_weights(kernel, x_shape, n):
  rng = np.random.default_rng(n)
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = weights.Int8Weight.quantize(jnp.asarray(rng.standard_normal((x_shape[-1], n))), 1)
  got = jax.jit(cpu_kernels.matmul_int8)(x, w)
  expected = np.asarray(x, np.float64) @ np.asarray(w.matrix(jnp.float32), np.float64)
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.sqrt(x_shape[-1]) *
                             np.abs(expected).max())


def _attention_float64(q, k, v, start):
  y = np.zeros(q.shape)
  for b, n, t in np.ndindex(*q.shape[:3]):
    keys = min(start[b] + t + 1, k.shape[2])
    logits = k[b, n, :keys].astype(np.float64) @ q[b, n, t] / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max())
    y[b, n, t] = weights / weights.sum() @ v[b, n, :keys]
  return y


@pytest.mark.parametrize("shape", [(1, 12, 1, 1024, 64), (3, 2, 4, 40, 64), (2, 3, 2, 9, 5)])
def test_attention_kernel_equals_float64_softmax_over_the_keys_up_to_each_position(kernel, shape):
  b, n, t, s, d = shape
  rng = np.random.default_rng(s)
  q = rng.standard_normal((b, n, t, d)).astype(np.float32) * 3
  k, v = (rng.standard_normal((b, n, s, d)).astype(np.float32) for _ in range(2))
  start = rng.integers(0, s - t, b).astype(np.int32)
  start[0] = s - t  # the last query sees the whole cache
  got = jax.jit(cpu_kernels.attention)(q, k, v, start)
  np.testing.assert_allclose(got, _attention_float64(q, k, v, start), rtol=0, atol=2e-6)


def _attend(q, cache, start):
  return cache.attend(q, start)


def test_cached_attention_takes_the_kernel_for_one_float32_query_on_cpu(kernel):
  rng = np.random.default_rng(0)
  cache = kv_cache.KernelKVCache(*(jnp.asarray(rng.standard_normal((2, 3, 70, 64)), jnp.float32)
                                   for _ in range(2)))
  q, start = jnp.asarray(rng.standard_normal((2, 3, 1, 64)), jnp.float32), jnp.array([5, 69])
  lowered = jax.jit(_attend).lower(q, cache, start).as_text()
  assert lowered.count(cpu_kernels.ATTENTION_TARGET) == 1
  np.testing.assert_allclose(cache.attend(q, start),
                             _attention_float64(*map(np.asarray, (q, cache.k, cache.v, start))),
                             atol=2e-6)


def test_kernel_rejects_other_dtypes(kernel):
  with pytest.raises(TypeError, match="bfloat16 w"):
    cpu_kernels.matmul(jnp.ones((1, 4)), jnp.ones((4, 2)))


def _custom_calls(f, *args, target: str = cpu_kernels.TARGET) -> int:
  traced = lambda *a: f(*a)  # a fresh function: jit's cache would return an earlier trace
  return jax.jit(traced).lower(*args).as_text().count(target)


def test_inference_matmul_takes_the_kernel_only_for_few_rows_of_bfloat16(kernel):
  w16 = jnp.ones((8, 4), jnp.bfloat16)
  assert _custom_calls(weights.inference_matmul, jnp.ones((1, 8)), w16) == 1
  too_many = jnp.ones((cpu_kernels.MAX_ROWS + 1, 8))
  assert _custom_calls(weights.inference_matmul, too_many, w16) == 0
  assert _custom_calls(weights.inference_matmul, jnp.ones((1, 8)), jnp.ones((8, 4))) == 0


def test_column_blocks_hold_16_columns_of_every_row():
  matrix = np.arange(24 * 48).reshape(24, 48)
  blocks = np.asarray(cpu_kernels.column_blocks(jnp.asarray(matrix)))
  assert blocks.shape == (3, 24, 16)
  np.testing.assert_array_equal(blocks[1], matrix[:, 16:32])
  np.testing.assert_array_equal(cpu_kernels.from_column_blocks(blocks), matrix)


@pytest.mark.parametrize("x_shape,n", [((1, 768), 2304), ((5, 64), 80), ((13, 40), 48),
                                       ((33, 16), 16), ((2, 3, 24), 32)])
def test_column_block_kernel_equals_float64_product(kernel, x_shape, n):
  """Any number of rows (8-row groups and a partial one), whole 3-block items and single blocks."""
  rng = np.random.default_rng(n)
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = rng.standard_normal((x_shape[-1], n)).astype(np.float32)
  got = jax.jit(cpu_kernels.matmul_column_blocks)(x, cpu_kernels.column_blocks(jnp.asarray(w)))
  assert got.shape == x_shape[:-1] + (n,)
  expected = np.asarray(x, np.float64) @ w
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.sqrt(x_shape[-1]) *
                             np.abs(expected).max())


def test_column_block_weight_stands_in_for_its_parameter(kernel):
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)  # K = 2 x 16 over two axes
  blocked = weights.ColumnBlockWeight.of(w, input_axes=2)
  assert blocked.matrix_shape == (32, 32)
  np.testing.assert_array_equal(blocked.astype(jnp.float32), w)
  x = jnp.asarray(rng.standard_normal((9, 32)), jnp.float32)
  for rows in (1, 9):  # the kernel at any number of rows
    assert _custom_calls(weights.inference_matmul, x[:rows], blocked,
                         target=cpu_kernels.COLUMN_BLOCKS_TARGET) == 1
  np.testing.assert_allclose(x @ blocked, x @ w.reshape(32, 32),
                             rtol=1e-6, atol=1e-5)
  with pytest.raises(ValueError, match="divisible by 16"):
    weights.ColumnBlockWeight.of(jnp.ones((32, 8)), input_axes=1)


def test_sampler_keeps_float32_matrices_in_column_blocks_on_cpu(kernel, golden_dir):
  model = checkpoint.load_model(golden_dir / "tiny.pth")
  stored = lambda dtype: jax.tree.leaves(
      sampling.Sampler(model, batch=2, dtype=dtype).params,
      is_leaf=lambda p: isinstance(p, (weights.ColumnBlockWeight, weights.Int8Weight)))
  count = lambda leaves, kind: sum(isinstance(p, kind) for p in leaves)
  blocks = model.cfg.patch_layers + model.cfg.char_layers
  assert count(stored(None), weights.ColumnBlockWeight) == 4 * blocks
  assert count(stored("bfloat16"), weights.ColumnBlockWeight) == 0
  assert count(stored("int8"), weights.Int8Weight) == 4 * blocks


def test_disabled_kernel_falls_back_to_xla(monkeypatch):
  monkeypatch.setenv("NOTAGEN_JAX_CPU_KERNELS", "0")
  cpu_kernels._load.cache_clear()
  try:
    assert not cpu_kernels.available()
    x, w = jnp.ones((1, 8)), jnp.full((8, 4), 0.5, jnp.bfloat16)
    assert _custom_calls(weights.inference_matmul, x, w) == 0
    np.testing.assert_array_equal(weights.inference_matmul(x, w), np.full((1, 4), 4.0))
    w8 = weights.Int8Weight.quantize(jnp.full((32, 16), 0.5), 1)
    np.testing.assert_array_equal(weights.inference_matmul(jnp.ones((1, 32)), w8),
                                  np.full((1, 16), 16.0))
    blocked = weights.ColumnBlockWeight.of(jnp.full((32, 16), 0.5), 1)
    assert _custom_calls(weights.inference_matmul, jnp.ones((1, 32)), blocked,
                         target=cpu_kernels.COLUMN_BLOCKS_TARGET) == 0
    np.testing.assert_array_equal(weights.inference_matmul(jnp.ones((1, 32)), blocked),
                                  np.full((1, 16), 16.0))
    rng = np.random.default_rng(0)
    cache = kv_cache.KernelKVCache(*(jnp.asarray(rng.standard_normal((1, 2, 8, 64)), jnp.float32)
                                     for _ in range(2)))
    q, start = jnp.asarray(rng.standard_normal((1, 2, 1, 64)), jnp.float32), jnp.array([3])
    lowered = jax.jit(lambda *a: _attend(*a)).lower(q, cache, start)
    assert cpu_kernels.ATTENTION_TARGET not in lowered.as_text()
    np.testing.assert_allclose(cache.attend(q, start),
                               _attention_float64(*map(np.asarray, (q, cache.k, cache.v, start))),
                               atol=2e-6)
  finally:
    cpu_kernels._load.cache_clear()


# The prompt's products round activations to bfloat16 (XLA's fast dot): hidden states agree to
# about 4e-3 on the tiny model.
PROMPT_ATOL = 1e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_narrow_weights_decode_as_the_full_forward_of_the_same_weights(kernel, golden_dir, dtype):
  """Cached decoding at one row (the kernels) = the float32 forward of the weights as stored."""
  case = json.loads((golden_dir / "cases.json").read_text())["cases"][1]
  model = checkpoint.load_model(golden_dir / "tiny.pth")
  graphdef, state = nnx.split(model)
  stored = nnx.merge(graphdef, weights.store(state, dtype))
  widened = sampling.as_stored(model, dtype)
  ids = np.asarray(case["patch_ids"], np.int32)
  patches, mask = jnp.asarray(ids[None, :30]), jnp.ones((1, 30), jnp.int32)
  target = ids[30]
  cfg = model.cfg
  cache = [kv_cache.KernelKVCache.empty(cfg, 1, 32) for _ in range(cfg.patch_layers)]
  hidden, cache = stored.patch.decode(patches[:, :29], cache, jnp.zeros(1, jnp.int32))
  np.testing.assert_allclose(
      hidden[0], widened.patch(patches[:, :29], mask[:, :29], deterministic=True, rngs=None)[0],
      atol=PROMPT_ATOL)
  hidden, cache = stored.patch.decode(patches[:, 29:], cache, jnp.full((1,), 29))  # one row
  char_cache = [kv_cache.KernelKVCache.empty(cfg, 1, 16) for _ in range(cfg.char_layers)]
  expected_hidden = widened.patch(patches, mask, deterministic=True, rngs=None)[:, -1:]
  np.testing.assert_allclose(hidden, expected_hidden, atol=PROMPT_ATOL)
  previous = 0
  for t in range(16):
    x = stored.char.embed(expected_hidden, jnp.full((1, 1), previous), jnp.full((1, 1), t))
    logprobs, char_cache = stored.char.decode(x, char_cache, jnp.full((1,), t))
    if t in (0, 5, 15):
      prefix = jnp.asarray(target[None, :t])
      expected = model_lib.next_char_probs(widened, patches, mask, prefix)
      np.testing.assert_allclose(np.exp(logprobs[0, 0]), expected[0], rtol=1e-4, atol=1e-6)
    previous = int(target[t])


def test_sampler_rejects_an_unknown_weights_dtype(golden_dir):
  with pytest.raises(ValueError, match="'float16' is not one of"):
    sampling.Sampler(checkpoint.load_model(golden_dir / "tiny.pth"), dtype="float16")


def test_loglik_scores_the_weights_as_stored(golden_dir, tmp_path, capsys):
  from notagen_jax import loglik  # pylint: disable=import-outside-toplevel
  case = json.loads((golden_dir / "cases.json").read_text())["cases"][0]
  piece = tmp_path / "piece.abc"
  piece.write_text(case["input_text"])
  nll = {}
  for dtype in ("float32", "int8"):
    loglik.main(["--checkpoint", str(golden_dir / "tiny.pth"), "--weights_dtype", dtype,
                 str(piece)])
    nll[dtype] = json.loads(capsys.readouterr().out)["mean_nll"]
  assert nll["int8"] != nll["float32"] and abs(nll["int8"] - nll["float32"]) < 0.01 * nll["float32"]
