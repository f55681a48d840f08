import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import notagen_reference as reference
from notagen_jax import generation
from notagen_jax import metrics
from notagen_jax import model as model_lib
from notagen_jax import sampling

HEADER = ('%Baroque\n%Bach, Johann Sebastian\n%Keyboard\n%%score { 1 | 2 }\nL:1/8\nM:4/4\nK:C\n'
          'V:1 treble nm="Piano"\nV:2 bass\n')
# Four bars of 8 eighths, as the sampler writes them (markers, rest-reduced). Bar 1: a triplet
# (3 notes in the time of 2) in the treble; bar 2 has no bass (rest reduction), and its broken
# rhythms (c>d, e<f: 2 each) and chord ([CEG]4: 4) fill the bar; the bass's grace note {B,}
# counts zero in bar 3. Bar 4 is one eighth short in the bass: one bar of four misaligned.
ALIGNED_BARS = ("[r:0/3][V:1]cdef gabc'|[V:2]C,8|\n"
                "[r:1/2][V:1](3cde d2 c4|[V:2]C,4 G,,4|\n"
                "[r:2/1][V:1]c>d e<f [CEG]4|\n"
                "[r:3/0][V:1]c8|][V:2]{B,}C,8|]\n")
ONE_MISALIGNED = ALIGNED_BARS.replace("{B,}C,8|]", "{B,}C,7|]")
# A triplet missing its third note: abctoolkit cannot time the bar.
UNMEASURED = ALIGNED_BARS.replace("[V:2]C,4 G,,4|", "[V:2](3C,D,|")
TWICE = "[r:0/0][V:1]c8|[V:1]c8|\n"  # a voice twice in a line: cannot be un-reduced


def test_bar_alignment_error_of_hand_counted_pieces():
  assert metrics.piece_metrics(HEADER + ALIGNED_BARS) == metrics.PieceMetrics(
      bars=4, misaligned_bars=0, unmeasured_bars=0, aligned=True, grouped=True)
  assert metrics.piece_metrics(HEADER + ONE_MISALIGNED) == metrics.PieceMetrics(
      bars=4, misaligned_bars=1, unmeasured_bars=0, aligned=False, grouped=True)
  assert metrics.piece_metrics(HEADER + UNMEASURED) == metrics.PieceMetrics(
      bars=4, misaligned_bars=0, unmeasured_bars=1, aligned=False, grouped=True)
  # A piece that cannot be un-reduced has no bars and fails the alignment filter.
  assert metrics.piece_metrics(HEADER + TWICE) == metrics.PieceMetrics(grouped=True)
  summary = metrics.summarize([metrics.piece_metrics(HEADER + ONE_MISALIGNED)])
  assert summary["bar_alignment_error"] == 0.25


def test_durations_are_read_as_abctoolkit_reads_them():
  durations = metrics.bar_durations("X:1\nL:1/8\nM:4/4\nV:1\nV:2\n"
                                    "[V:1]|:(3cde d2 c4|[V:2]|:c>d e<f [CEG]4|\n"
                                    "[V:1]{ga}c8|[V:2]c/d/e/f/ g6:|\n")
  assert durations == [{"V:1": 8, "V:2": 8}, {"V:1": 8, "V:2": 8}]


def test_grouping_filter_is_counted_per_piece():
  apart = HEADER.replace("V:2 bass\n", 'V:2 bass nm="Violin"\nV:3 bass nm="Piano"\n')
  assert not metrics.piece_metrics(apart + ALIGNED_BARS).grouped


def test_summary_counts_bars_over_pieces_and_unreadable_pieces_apart():
  pieces = [metrics.piece_metrics(HEADER + text)
            for text in (ALIGNED_BARS, ONE_MISALIGNED, UNMEASURED, TWICE)]
  assert metrics.summarize(pieces) == {
      "bars": 12, "misaligned_bars": 1, "unmeasured_bars": 1, "bar_alignment_error": 0.166667,
      "aligned_share": 0.25, "grouped_share": 1.0, "perplexity": None, "scored_chars": 0}
  assert metrics.summarize([])["bar_alignment_error"] is None


@pytest.fixture(scope="module")
def tiny_model():
  cfg = model_lib.ModelConfig(patch_length=64, patch_layers=1, char_layers=1, hidden=64,
                              dropout=0.0)
  return model_lib.NotaGen(cfg, nnx.Rngs(3))


def _reference_logprob(model, text):
  """Summed log-prob and count of the scored chars, from the forward pass's own outputs, on the
  original's DPO encoding at its exact length (no bucket padding)."""
  ids = np.asarray(reference.encode_train(text, model.cfg.patch_length, dpo=True), np.int32)
  out = nnx.jit(model_lib.forward)(model, jnp.asarray(ids[None]),
                                   jnp.ones((1, len(ids)), jnp.int32))
  logprob, mask = np.asarray(out.char_logprob, np.float64), np.asarray(out.char_mask)
  return logprob[mask > 0].sum(), int(mask.sum())


def test_perplexity_is_char_weighted_over_pieces(tiny_model):
  texts = [HEADER + ALIGNED_BARS, HEADER + TWICE]
  pieces, expected = [], []
  for text in texts:
    scored = metrics.log_likelihood(tiny_model, text)
    expected.append(_reference_logprob(tiny_model, text))
    assert scored["scored_chars"] == expected[-1][1]
    assert scored["sum_logprob"] == pytest.approx(expected[-1][0], rel=1e-5)
    pieces.append(metrics.PieceMetrics(**scored))
  expected = math.exp(-sum(s for s, _ in expected) / sum(n for _, n in expected))
  assert metrics.perplexity(pieces) == pytest.approx(expected, rel=1e-5)
  assert metrics.perplexity([metrics.PieceMetrics()]) is None


def test_summary_keys(tmp_path):
  results = [sampling.Result(i, HEADER, HEADER + body, True, "", 4, 0, 1.0)
             for i, body in enumerate([ONE_MISALIGNED, TWICE])]
  written = [generation.write_piece(result, tmp_path, f"p{result.index}", ())
             for result in results]
  summary = generation.summary(written)
  assert list(summary) == [
      "pieces", "complete", "unreduced_share", "musicxml_share", "midi_share", "chars", "bars",
      "misaligned_bars", "unmeasured_bars", "bar_alignment_error", "aligned_share",
      "grouped_share", "perplexity", "scored_chars"]
  assert (summary["unreduced_share"], summary["bar_alignment_error"]) == (0.5, 0.25)

