import json
import re

import numpy as np
import pytest

from notagen_jax.data import abc
from notagen_jax.scoring import preferences


class FeatureLineEmbedder:
  """Reads each piece's feature vector from a `%f a b c` comment line; NaN without one."""
  name = "feature-line"

  def __init__(self):
    self.calls = 0

  def embed(self, texts):
    self.calls += 1
    rows = []
    for text in texts:
      match = re.search(r"^%f (.*)$", text, re.MULTILINE)
      rows.append([float(x) for x in match.group(1).split()] if match else [np.nan] * 3)
    return np.array(rows, np.float32)


def _piece(vector, second_bar="A,4", names=("Violin", "Cello")):
  """A generated (rest-reduced, stream-marked) piece carrying its feature vector."""
  header = "".join(f'V:{i} treble nm="{name}"\n' for i, name in enumerate(names, 1))
  return (f"%f {' '.join(map(str, vector))}\nL:1/8\nM:2/4\nK:C\n{header}"
          f"[r:0/1][V:1]ab cd|[V:2]{second_bar}|\n[r:1/0][V:1]ef ga|]\n")


GROUND_TRUTH = np.array([[1, 0, 0], [0, 1, 0], [np.nan, np.nan, np.nan]], np.float32)
PIECES = [
    _piece([1, 1, 0.1]),  # 0: best
    _piece([1, 1, 0.2], second_bar="A,3"),  # 1: voice 2's bar is too short
    _piece([1, 1, 0.3], names=("Violin", "Cello", "Violin")),  # 2: violin staves apart
    _piece([1, 0, 0]),  # 3: a copy of a ground-truth piece
    _piece([1, 1, 0.5]),  # 4
    "%f 1 1 0\nL:1/8\nK:C\n",  # 5: no body, cannot be un-reduced
    _piece([1, 1, 1]),  # 6
    _piece([1, 1, 2]),  # 7
    _piece([1, 1, 3]),  # 8
    _piece([1, 1, 4]),  # 9
    _piece([0.2, 0.1, 5]),  # 10: worst
]


def _score(vector):
  """Cosine with the mean ground truth [0.5, 0.5, 0] (the NaN row is left out)."""
  a, b, c = vector
  return (a + b) / (np.sqrt(2) * np.sqrt(a * a + b * b + c * c))


def test_cosine_by_hand():
  np.testing.assert_allclose(preferences.cosine([1, 0], [[1, 0], [0, 1], [1, 1]]),
                             [1, 0, 1 / np.sqrt(2)])
  assert preferences.cosine(np.ones((4, 3)), np.ones((2, 3))).shape == (4, 2)
  assert np.isnan(preferences.cosine([0, 0], [1, 0]))
  np.testing.assert_allclose(preferences.mean_feature(GROUND_TRUTH), [0.5, 0.5, 0])
  with pytest.raises(ValueError, match="no ground-truth piece"):
    preferences.mean_feature(GROUND_TRUTH[2:])


def test_instruments_grouped():
  assert preferences.instruments_grouped(_piece([0, 0, 0], names=("Piano", "Piano", "Cello")))
  assert not preferences.instruments_grouped(_piece([0, 0, 0], names=("Piano", "Cello", "Piano")))
  # Voices without a name do not count.
  assert preferences.instruments_grouped("V:1 nm=\"A\"\nV:2 treble\nV:3 nm=\"A\"\n[V:1]a|\n")


def test_bars_aligned(golden_dir):
  for case in json.loads((golden_dir / "prepare_cases.json").read_text())["cases"]:
    assert preferences.bars_aligned(abc.unreduce(case["augmented_rest_reduced"]["C"]))
  assert preferences.bars_aligned(abc.unreduce(PIECES[0]))
  assert not preferences.bars_aligned(abc.unreduce(PIECES[1]))  # a bar of 3 against 4
  assert not preferences.bars_aligned("[V:1]abc|\n")  # unreadable


def test_select_by_hand():
  scores = np.array([0.5, np.nan, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.95])
  passes = np.ones(11, bool)
  passes[10] = False
  # 10 scored, 20% -> 2 each; the best (0.95) fails a filter; NaN takes no part.
  assert preferences.select(scores, passes, 0.2) == ([2, 6], [7, 3])
  assert preferences.select(scores, passes, 0.05) == ([], [])
  # Ties keep the generation order.
  assert preferences.select(np.full(4, 0.5), np.ones(4, bool), 0.5) == ([0, 1], [2, 3])
  # When too few pass, the chosen set does not reach into the rejected set.
  assert preferences.select(np.array([0.9, 0.8, 0.1, 0.2]), np.array([0, 0, 1, 0], bool),
                            0.5) == ([], [3, 2])


def test_choose_scores_filters_and_counts():
  selection = preferences.choose(PIECES, FeatureLineEmbedder(), GROUND_TRUTH, fraction=0.2)
  expected = [np.nan if i == 5 else _score([float(x) for x in p.split("\n")[0].split()[1:]])
              for i, p in enumerate(PIECES)]
  np.testing.assert_allclose(selection.scores, expected, rtol=1e-6)
  # By score: 0, 1, 2, 4, 6, 3, 7, 8, 9, 10; 1, 2 and 3 fail a filter each.
  assert selection.chosen == [0, 4]
  assert selection.rejected == [9, 10]
  assert selection.interleaved[5] is None
  assert selection.interleaved[0] == abc.unreduce(PIECES[0])
  assert selection.counts == preferences.Counts(
      generated=11, scored=10, failed=1, misaligned=1, instruments_apart=1, plagiarized=1,
      chosen=2, rejected=2, mean_score=pytest.approx(np.nanmean(expected), rel=1e-6))


def test_chosen_filters_can_be_narrowed_but_a_chosen_piece_always_un_reduces():
  selection = preferences.choose(PIECES, FeatureLineEmbedder(), GROUND_TRUTH, fraction=0.2,
                                 filters=("grouped", "original"))
  assert selection.chosen == [0, 1]  # piece 1's short bar no longer bars it
  assert selection.counts.misaligned == 1  # counted all the same
  with pytest.raises(ValueError, match="unknown filters"):
    preferences.choose(PIECES, FeatureLineEmbedder(), GROUND_TRUTH, filters=("pretty",))


def test_malformed_pieces_can_be_scored_to_be_rejected():
  # Piece 5 cannot be un-reduced; scored as generated, its score (0.5, 0.5, 0 direction) is the
  # best of all, yet it is never chosen.
  selection = preferences.choose(PIECES, FeatureLineEmbedder(), GROUND_TRUTH, fraction=0.2,
                                 score_malformed=True)
  assert np.isfinite(selection.scores[5]) and selection.scores[5] == np.nanmax(selection.scores)
  assert 5 not in selection.chosen and selection.chosen == [0, 4]
  assert selection.counts.scored == 11 and selection.interleaved[5] is None


def test_choose_counts_a_piece_the_embedder_cannot_read():
  pieces = PIECES[:4] + [PIECES[4].replace("%f", "%g")]
  counts = preferences.choose(pieces, FeatureLineEmbedder(), GROUND_TRUTH).counts
  assert (counts.scored, counts.failed) == (4, 1)


def test_write_preferences_keeps_the_raw_texts(tmp_path):
  selection = preferences.choose(PIECES, FeatureLineEmbedder(), GROUND_TRUTH, fraction=0.2)
  path = tmp_path / "pairs" / "iteration_1.json"
  preferences.write_preferences(path, PIECES, selection)
  data = json.loads(path.read_text())
  assert data == {"chosen": [PIECES[0], PIECES[4]], "rejected": [PIECES[9], PIECES[10]]}
  assert all("[r:0/1]" in text for text in data["chosen"] + data["rejected"])


def test_ground_truth_features_are_cached(tmp_path):
  for name, text in (("b.abc", "%f 0 1 0\n"), ("a.abc", "%f 1 0 0\n"), ("c.txt", "x")):
    (tmp_path / "corpus" / name).parent.mkdir(exist_ok=True)
    (tmp_path / "corpus" / name).write_text(text)
  texts = preferences.read_texts(tmp_path / "corpus")
  assert texts == ["%f 1 0 0\n", "%f 0 1 0\n"]
  embedder, cache = FeatureLineEmbedder(), tmp_path / "cache" / "gt.npy"
  features = preferences.ground_truth_features(texts + ["unreadable"], embedder, cache)
  np.testing.assert_array_equal(features, GROUND_TRUTH)
  np.testing.assert_array_equal(
      preferences.ground_truth_features(texts + ["unreadable"], embedder, cache), GROUND_TRUTH)
  assert embedder.calls == 1
  preferences.ground_truth_features(texts, embedder, cache)  # other texts: computed again
  assert embedder.calls == 2
  with pytest.raises(FileNotFoundError):
    preferences.read_texts(tmp_path / "cache", "*.abc")
