import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from notagen_jax import checkpoint
from notagen_jax import model as model_lib
from notagen_jax import sampling
from notagen_jax.data import tokenizer

PROMPT = "%Baroque\n%Bach, Johann Sebastian\n%Choral\n"


@pytest.fixture(scope="module")
def cases(golden_dir):
  return json.loads((golden_dir / "cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def sharp_model(golden_dir):
  """The golden tiny model with sharpened weights: peaked distributions, as a trained model has."""
  model = checkpoint.load_model(golden_dir / "tiny.pth")
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda v: (3.0 * v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype),
                       state)
  return nnx.merge(graphdef, state)


def _numpy_filter(probs, top_k, top_p, temperature):
  """The spec's filters, written plainly."""
  probs = np.array(probs, np.float64)
  order = np.argsort(-probs, kind="stable")
  if top_k:
    probs[order[top_k:]] = 0.0
    probs /= probs.sum()
  if top_p < 1.0:
    cumulative, keep = 0.0, []
    for index in order:
      if probs[index] == 0.0:
        break
      keep.append(index)
      cumulative += probs[index]
      if cumulative > top_p:
        break
    kept = np.zeros_like(probs)
    kept[keep] = probs[keep]
    probs = kept / kept.sum()
  probs = probs ** (1.0 / temperature)
  return probs / probs.sum()


@pytest.mark.parametrize("top_k,top_p,temperature", [(9, 0.9, 1.2), (0, 0.5, 1.0), (3, 1.0, 0.7),
                                                     (128, 0.99, 2.0)])
def test_filters_equal_plain_numpy(top_k, top_p, temperature):
  rng = np.random.default_rng(top_k)
  probs = rng.dirichlet(np.full(128, 0.3), size=20).astype(np.float32)
  got = np.asarray(sampling.filter_probs(jnp.asarray(probs), top_k, top_p, temperature))
  for row, expected in zip(got, probs):
    np.testing.assert_allclose(row, _numpy_filter(expected, top_k, top_p, temperature), atol=2e-6)


def test_draws_follow_the_filtered_distribution():
  probs = jnp.asarray([[0.5, 0.3, 0.15, 0.05] + [0.0] * 124])
  settings = sampling.Settings(top_k=3, top_p=0.75, temperature=1.0)
  keys = jax.random.split(jax.random.key(1), 4000)
  chars = np.asarray(jax.vmap(lambda k: sampling.draw(k[None], probs, settings)[0])(keys))
  # top-3 keeps 0.5/0.3/0.15; top-p 0.75 keeps the first two (0.5 + 0.3 crosses), renormalized.
  assert set(np.unique(chars)) == {0, 1}
  assert abs((chars == 0).mean() - 0.5 / 0.8) < 0.03


def test_patch_decoder_cache_matches_full_forward(sharp_model, cases):
  ids = np.asarray(cases[0]["patch_ids"], np.int32)[None, :40]
  full = sharp_model.patch(jnp.asarray(ids), jnp.ones((1, 40), jnp.int32), deterministic=True,
                           rngs=None)
  cache = [model_lib.KVCache.empty(sharp_model.cfg, 1, 64)
           for _ in range(sharp_model.cfg.patch_layers)]
  hidden, cache = sharp_model.patch.decode(jnp.asarray(ids[:, :32]), cache, jnp.zeros(1, jnp.int32))
  np.testing.assert_allclose(hidden[0], full[0, :32], atol=2e-5)
  for i in range(32, 40):
    hidden, cache = sharp_model.patch.decode(jnp.asarray(ids[:, i:i + 1]), cache,
                                             jnp.full((1,), i, jnp.int32))
    np.testing.assert_allclose(hidden[0, 0], full[0, i], atol=2e-5)


def test_char_decoder_cache_matches_full_forward(sharp_model, cases):
  ids = np.asarray(cases[1]["patch_ids"], np.int32)
  patches, mask = jnp.asarray(ids[None, :30]), jnp.ones((1, 30), jnp.int32)
  target = ids[30]
  hidden = sharp_model.patch(patches, mask, deterministic=True, rngs=None)[:, -1]
  cache = [model_lib.KVCache.empty(sharp_model.cfg, 1, 16)
           for _ in range(sharp_model.cfg.char_layers)]
  previous = 0
  for t in range(16):
    x = sharp_model.char.embed(hidden[:, None], jnp.full((1, 1), previous), jnp.full((1, 1), t))
    logprobs, cache = sharp_model.char.decode(x, cache, jnp.full((1,), t))
    if t in (0, 1, 7, 15):  # each prefix length compiles the full forward anew
      expected = model_lib.next_char_probs(sharp_model, patches, mask,
                                           jnp.asarray(target[None, :t]))
      np.testing.assert_allclose(np.exp(logprobs[0, 0]), expected[0], rtol=1e-5, atol=1e-6)
    previous = int(target[t])


_next_char_probs = nnx.jit(model_lib.next_char_probs)


def _reference_generate(model, prompt, seed, index, settings):
  """The original's inference loop (NOTAGEN_REFERENCE.md, section 7) for one piece, uncached: a
  full forward for every character. -> (text, ok).

  The sampler's choices kept: the same keys (fold_in of seed, piece index, patches drawn, char
  position) so that the two must draw the same characters, a prompt that may open the body, and
  the prompt's metadata kept on overflow (`Settings.keep_prompt_on_overflow`).
  """
  cfg = model.cfg
  p = cfg.patch_size
  patchilizer = tokenizer.Patchilizer(patch_size=p, patch_length=cfg.patch_length)
  key = jax.random.fold_in(jax.random.key(seed), index)

  def encode(text):
    """The context's whole patches and the chars of its open last patch."""
    if any(line.startswith(("[r:", "[V:")) for line in text.split("\n")):
      patches = patchilizer.encode_generate(text)
    else:  # metadata lines, each cut into patches, eos after a line that does not fill its last
      patches = [[tokenizer.BOS] * (p - 1) + [tokenizer.EOS]]
      for line in text.split("\n"):
        if line:
          codes = [ord(c) for c in line + "\n"] + [tokenizer.EOS] * bool((len(line) + 1) % p)
          patches += [codes[i:i + p] for i in range(0, len(codes), p)]
      patches = [patch + [tokenizer.PAD] * (p - len(patch)) for patch in patches]
    prefix = patches.pop() if len(patches[-1]) < p else []
    return [list(patch) for patch in patches], list(prefix)

  lines = prompt.splitlines(keepends=True)
  body_start = next((i for i, line in enumerate(lines) if line.startswith(("[r:", "[V:"))), None)
  tunebody_flag = body_start is not None
  if tunebody_flag:
    head = "".join(lines[:body_start])
    tunebody = prompt[len(head):]
  else:
    head = prompt if settings.keep_prompt_on_overflow else ""
    tunebody = ""
  context, prefix = encode(prompt)
  generated, metadata = [], ""
  step = 0

  def generate_patch(prefix, keys):
    # Padded to the full context so that one compiled forward serves every length.
    patches = np.zeros((1, cfg.patch_length, p), np.int32)
    patches[0, :len(context)] = context
    mask = (np.arange(cfg.patch_length) < len(context))[None].astype(np.int32)
    chars = list(prefix)
    for t in range(len(chars), p):
      probs = _next_char_probs(model, patches, mask, np.asarray([chars], np.int32))
      char_key = jax.random.fold_in(keys, t)
      chars.append(int(sampling.draw(char_key[None], probs, settings)[0]))
    return chars

  while True:
    keys = jax.random.fold_in(key, step)
    chars = generate_patch(prefix, keys)
    text_from = len(prefix)
    if not tunebody_flag and bytes(chars[text_from:text_from + 3]) == b"[r:":
      tunebody_flag = True
      chars = generate_patch([ord(c) for c in "[r:0/"], jax.random.fold_in(keys, p))
      text_from = 0
    step += 1
    if chars[text_from:text_from + 2] == [tokenizer.BOS, tokenizer.EOS]:
      return prompt + "".join(generated), True
    if tokenizer.EOS in chars:
      cut = chars.index(tokenizer.EOS) + 1
      chars = chars[:cut] + [tokenizer.PAD] * (p - cut)
    text = patchilizer.decode([chars[text_from:]])
    generated.append(text)
    if tunebody_flag:
      tunebody += text
    else:
      metadata += text
    context.append(chars)
    prefix = []
    if len(prompt) + len("".join(generated)) > settings.max_chars:
      return prompt + "".join(generated), False
    if len(context) >= cfg.patch_length:
      if "\n" not in tunebody:
        return prompt + "".join(generated), True
      body_lines = tunebody.strip().split("\n")
      if tunebody.endswith("\n"):
        body_lines = [line + "\n" for line in body_lines]
      else:
        body_lines = [line + "\n" for line in body_lines[:-1]] + body_lines[-1:]
      tunebody = "".join(body_lines[-(len(body_lines) // 2):])
      context, prefix = encode(head + metadata + tunebody)


def test_sampler_draws_what_the_uncached_loop_draws(sharp_model):
  settings = sampling.Settings(max_chars=400)
  sampler = sampling.Sampler(sharp_model, settings, batch=2, patches_per_call=4)
  compiled = sampling._generate._cache_size()
  results = sampler.run([PROMPT] * 3, seed=7)
  # One program for the whole run: finishing and refilling rows changes no input's type.
  assert sampling._generate._cache_size() == compiled + 1
  for result in results:
    expected, ok = _reference_generate(sharp_model, PROMPT, 7, result.index, settings)
    assert result.text == expected
    assert result.ok == ok
  assert len({r.text for r in results}) == 3  # every piece its own stream


def test_pieces_do_not_depend_on_batch_size(sharp_model):
  settings = sampling.Settings(max_chars=500)
  one = sampling.Sampler(sharp_model, settings, batch=1, patches_per_call=3).run([PROMPT] * 2, 3)
  four = sampling.Sampler(sharp_model, settings, batch=4, patches_per_call=5).run([PROMPT] * 2, 3)
  assert [r.text for r in one] == [r.text for r in four]


@pytest.mark.parametrize("constrained", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_pieces_do_not_depend_on_the_devices(sharp_model, constrained):
  """Rows spread over the 8 simulated devices draw what one device draws, and a share of the
  pieces drawn under their own indices (a process's share) equals those pieces of the whole."""
  assert jax.local_device_count() == 8
  settings = sampling.Settings(max_chars=200, constrained=constrained)
  one = sampling.Sampler(sharp_model, settings, batch=8, devices=jax.devices()[:1])
  eight = sampling.Sampler(sharp_model, settings, batch=8)
  assert eight.mesh.size == 8 and eight.rows_per_device == 1
  expected = [r.text for r in one.run([PROMPT] * 10, seed=5)]
  assert len(set(expected)) == 10
  assert [r.text for r in eight.run([PROMPT] * 10, seed=5)] == expected
  share = eight.run([PROMPT] * 3, seed=5, indices=[9, 1, 4])
  assert [(r.index, r.text) for r in share] == [(i, expected[i]) for i in (9, 1, 4)]


@pytest.mark.slow  # a minute or more: runs in CI's second pass
def test_full_context_keeps_metadata_and_the_last_half_of_the_body(sharp_model, cases):
  text = cases[0]["stream_text"]
  lines = tokenizer.text_lines(text)
  patchilizer = tokenizer.Patchilizer(patch_length=48)
  k = max(k for k in range(1, len(lines))
          if len(sampling.split_prompt(patchilizer, "".join(lines[:k]))[0]) < 36)
  # The last bar left open: the sampler must continue it (a prefix of the next patch).
  prompt = "".join(lines[:k]) + lines[k][:23]
  assert len(sampling.split_prompt(patchilizer, prompt)[1]) > 0
  settings = sampling.Settings(max_chars=len(prompt) + 1500)
  model = _short_context(sharp_model, 48)
  result = sampling.Sampler(model, settings, batch=2, patches_per_call=4).run([prompt], seed=1)[0]
  expected, ok = _reference_generate(model, prompt, 1, 0, settings)
  assert result.overflows >= 1
  assert result.text == expected and result.ok == ok


def _short_context(model, patch_length):
  """The same weights with only the first `patch_length` patch positions."""
  cfg = model_lib.config_for((patch_length, model.cfg.patch_layers, model.cfg.char_layers,
                              model.cfg.hidden))
  short = model_lib.create(cfg)
  pure = nnx.to_pure_dict(nnx.state(model))
  pure["patch"]["pos"] = pure["patch"]["pos"][:patch_length]
  state = nnx.state(short)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(short, state)
  return short


def test_first_body_patch_is_forced_to_start_at_line_zero(monkeypatch):
  cfg = model_lib.config_for((64, 1, 1, 64))
  model = model_lib.create(cfg)
  p = cfg.patch_size

  def fake_draw(model, hidden, prefix, prefix_len, keys, settings, cache_type, grammar, header):
    del model, hidden, keys, settings, cache_type, header
    body = jnp.asarray([ord(c) for c in "[r:3/4]abcdefghi"])
    return jnp.where(jnp.arange(p) < prefix_len[:, None], prefix, body), grammar

  monkeypatch.setattr(sampling, "_draw_patch", fake_draw)
  result = sampling.Sampler(model, sampling.Settings(max_chars=80), batch=1).run([PROMPT])[0]
  body = result.text[len(PROMPT):]
  # Forced once: the first body patch becomes `[r:0/` + what follows the prefix; later ones are not.
  assert body[:16] == "[r:0/" + "4]abcdefghi"
  assert body[16:32] == "[r:3/4]abcdefghi"


def test_int8_weights_that_no_kernel_multiplies_are_logged(golden_dir, caplog):
  model = checkpoint.load_model(golden_dir / "tiny.pth")
  sampling.Sampler(model, batch=64, dtype="int8")  # 8 rows on each of the 8 simulated devices
  assert ("int8 weights are dequantized to bfloat16 at every step" in caplog.text and
          "bfloat16 weights are faster" in caplog.text)


def test_a_stopped_constrained_piece_keeps_the_lines_it_may_end_with():
  head = "%Baroque\nL:1/8\nM:2/4\nK:C\nV:1\n[r:0/3][V:1]|:c4|\n"
  assert sampling.whole_lines(head + "[r:1/2][V:1]d4|1\n[r:2/1][V:1]e4:|2\n[r:3/0][V:1]f") == head
  assert sampling.whole_lines(head + "[r:1/2][V:1]d4||\n[r:2/1][V:1]e2") == (
      head + "[r:1/2][V:1]d4||\n")
  assert sampling.whole_lines("%Baroque\nL:1/8\nM:2/4\n") == "%Baroque\nL:1/8\nM:2/4\n"


def test_a_piece_past_max_patches_stops_only_after_a_line_it_may_end_with():
  piece = sampling.Piece(index=0, prompt="%Baroque\nL:1/8\nM:2/4\nK:C\nV:1\n", in_body=False,
                         start_time=0.0)
  # (A line's last patch may hold only its `\n`: the volta number is in the patch before.)
  patches = [("[r:0/1][V:1]|:c4", False), ("|\n", True), ("[r:1/0][V:1]d2 e2 f", False),
             ("2 g2 a2 b2 c'2 d'", False), ("2|1", False), ("\n", False)]
  for patch, may_stop in patches:
    piece.append(patch)
    assert piece.at_body_line_end == may_stop, patch
