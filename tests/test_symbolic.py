import json

import numpy as np
import pytest

from notagen_jax.scoring import symbolic


@pytest.fixture(scope="module")
def chorales(golden_dir):
  """Three Bach chorales (BWV 1.6, 104.6, 10.7) as cleaned, interleaved ABC."""
  cases = json.loads((golden_dir / "cases.json").read_text())["cases"]
  return [case["input_text"] for case in cases]


def _garbage(seed=0, bars=16):
  """Random chromatic notes of random lengths in two voices, ignoring the meter."""
  rng = np.random.default_rng(seed)
  pitches = [accidental + letter for accidental in ("", "^", "_") for letter in "CDEFGABcdefgab"]

  def bar(octave):
    return " ".join(rng.choice(pitches) + octave + str(rng.integers(1, 7)) for _ in range(4))

  body = "".join(f"[V:1]{bar('')}|[V:2]{bar(',')}|\n" for _ in range(bars))
  return "L:1/8\nM:4/4\nK:C\nV:1 treble\nV:2 bass\n" + body


def _block(vector, name):
  names = list(symbolic.BLOCK_SIZES)
  start = sum(symbolic.BLOCK_SIZES[block] for block in names[:names.index(name)])
  return vector[start:start + symbolic.BLOCK_SIZES[name]]


def _cosines(features):
  unit = features / np.linalg.norm(features, axis=1, keepdims=True)
  return unit @ unit.T


def test_chorales_are_closer_to_each_other_than_to_garbage(chorales):
  features = symbolic.SymbolicEmbedder().embed(chorales + [_garbage(0), _garbage(1)])
  cosines = _cosines(features)
  between_chorales = cosines[:3, :3][np.triu_indices(3, 1)]
  chorale_garbage = cosines[:3, 3:]
  assert between_chorales.min() > chorale_garbage.max() + 0.05, cosines


def test_fixed_dim_deterministic_and_nan_for_unreadable_text(chorales):
  texts = [chorales[0], "hello world", "", "L:1/8\nK:C\n", chorales[1]]
  embedder = symbolic.SymbolicEmbedder()
  features = embedder.embed(texts)
  assert embedder.name == "symbolic"
  assert features.shape == (5, symbolic.DIM) and features.dtype == np.float32
  finite = np.isfinite(features).all(axis=1)
  assert finite.tolist() == [True, False, False, False, True]
  assert np.isnan(features[~finite]).all()
  np.testing.assert_array_equal(embedder.embed(texts), features)
  # Every block has unit norm and the blocks weigh the same, so each piece has unit norm.
  np.testing.assert_allclose(np.linalg.norm(features[finite], axis=1), 1.0, rtol=1e-5)
  assert embedder.embed([]).shape == (0, symbolic.DIM)


def test_blocks_by_hand():
  scale = symbolic.features("L:1/4\nM:4/4\nK:G\nV:1\n[V:1]GABc|\n[V:1]de^fg|]\n")
  weight = 1 / np.sqrt(len(symbolic.BLOCK_SIZES))
  # Steps of the G major scale: whole, whole, half, whole, whole, whole, half.
  intervals = np.zeros(27)
  intervals[symbolic.MAX_INTERVAL + 1 + 1] = 2
  intervals[symbolic.MAX_INTERVAL + 1 + 2] = 5
  np.testing.assert_allclose(_block(scale, "interval"), weight * intervals / np.sqrt(29), atol=1e-6)
  # Time-weighted pitch classes, relative to the signature's tonic G.
  pitch_classes = np.zeros(12)
  pitch_classes[[0, 2, 4, 5, 7, 9, 11]] = [2, 1, 1, 1, 1, 1, 1]
  np.testing.assert_allclose(_block(scale, "pitch_class"),
                             weight * pitch_classes / np.linalg.norm(pitch_classes), atol=1e-6)
  # One voice, one pitch at a time: harmony is empty.
  assert not _block(scale, "harmony").any()

  def bump(value, centers, width):  # a smooth value's Gaussian bump over its bins, unit norm
    weights = np.exp(-0.5 * ((np.asarray(centers) - value) / width) ** 2)
    return weights / np.linalg.norm(weights)

  unit = lambda histogram: np.asarray(histogram, float) / np.linalg.norm(histogram)
  expected = {
      "pitch_class": unit(pitch_classes),
      "interval": unit(intervals),
      # Eight quarter notes: log2(1) = 0, the ninth of the half-step bins from 1/16.
      "duration": np.eye(15)[8],
      # Two on a bar line, six on the other beats.
      "onset": unit([2, 6, 0, 0, 0, 0, 0, 0]),
      # One onset per quarter note: log2(1) = 0.
      "density": bump(0.0, np.arange(-3.0, 3.5, 0.5), 0.5),
      # G4 (67) to G5 (79): 12 semitones; mean pitch (67+69+71+72+74+76+78+79) / 8 = 73.25.
      "range": bump(12.0, np.arange(0.0, 52.0, 4.0), 4.0),
      "register": bump(73.25, np.arange(24.0, 102.0, 6.0), 6.0),
      "sounding": bump(1.0, np.arange(0.0, 9.0), 1.0),
      "harmony": np.zeros(12),
      # Two 4/4 bars of four quarter notes.
      "bar_length": bump(4.0, np.arange(1.0, 8.5, 0.5), 0.75),
  }
  for name, block in expected.items():
    np.testing.assert_allclose(_block(scale, name), weight * block, atol=1e-6, err_msg=name)


def test_process_pool_gives_the_same_rows(chorales):
  texts = chorales[:2] + ["not music"]
  np.testing.assert_array_equal(symbolic.SymbolicEmbedder(workers=2).embed(texts),
                                symbolic.SymbolicEmbedder().embed(texts))
