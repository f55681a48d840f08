import json
import zipfile

import pytest

from notagen_jax.data import abc
from notagen_jax.data import corpus


@pytest.fixture(scope="module")
def prepare_cases(golden_dir):
  return json.loads((golden_dir / "prepare_cases.json").read_text())["cases"]


def _corpus_bytes(case):
  relative = case["source"].replace("music21 corpus ", "")
  return (corpus.music21_corpus_root() / relative).read_bytes()


def test_xml2abc_matches_original(prepare_cases):
  for case in prepare_cases:
    assert abc.musicxml_to_abc(_corpus_bytes(case)) == case["xml2abc_output"], case["source"]


def test_cleaning_interleaving_key_and_augmentation_match_original(prepare_cases):
  for case in prepare_cases:
    lines = abc.clean(case["xml2abc_output"])
    assert abc.interleave(lines) == case["interleaved"], case["source"]
    assert abc.original_key(lines) == case["original_key"]
    augmented = abc.augment(lines)
    assert list(augmented) == list(abc.KEYS)
    for key in abc.KEYS:
      assert augmented[key] == case["augmented_rest_reduced"][key], (case["source"], key)


def test_plain_xml_and_mxl_give_the_same_abc(prepare_cases):
  data = _corpus_bytes(prepare_cases[0])
  with zipfile.ZipFile(__import__("io").BytesIO(data)) as archive:
    xml = archive.read(next(n for n in archive.namelist()
                            if n.endswith(".xml") and not n.startswith("META")))
  assert abc.musicxml_to_abc(xml) == abc.musicxml_to_abc(data)


def test_unequal_bar_counts_are_rejected():
  text = "L:1/8\nM:2/4\nK:C\nV:1 treble\nV:2 bass\nV:1\nab cd | ef ga |\nV:2\nA,B, C,D, |\n"
  with pytest.raises(abc.PieceError, match="different bar counts"):
    abc.clean(text)


def test_annotations_are_tidied():
  text = ('L:1/8\nM:2/4\nK:C\nV:1 treble\nV:1\n"^cresc....."ab cd | "_' + "x" * 50 +
          '"ef "" ga | "^a|b"cd ef |\n')
  # A run of dots collapses to one; the 51-character annotation, the empty one and the one
  # holding a barline go (the spaces around them stay).
  assert abc.clean(text) == ["L:1/8\n", "M:2/4\n", "K:C\n", "V:1 treble\n", "V:1\n",
                             '"^cresc."ab cd | ef  ga | cd ef |\n']


def test_major_key_and_semitones():
  assert abc.major_key("Am") == "C" and abc.major_key("Ddor") == "C" and abc.major_key("none") == "C"
  assert [abc.key_semitone(k) for k in ("Cb", "C#", "Db", "F#", "Gb")] == [11, 1, 1, 6, 6]


def _with_stream_markers(text):
  """The body lines prefixed with `[r:i/j]`, as generated text carries them."""
  lines = text.splitlines(keepends=True)
  start = next(i for i, line in enumerate(lines) if line.startswith("[V:"))
  body = lines[start:]
  return "".join(lines[:start] + [f"[r:{i}/{len(body) - 1 - i}]{line}"
                                  for i, line in enumerate(body)])


def test_unreduce_inverts_rest_reduction_on_the_golden_pieces(prepare_cases):
  # On these pieces every dropped bar is a whole-bar rest written as the un-reduction writes it
  # (`z8`, `x4`, `x`), so the round trip is exact, with or without stream markers.
  reduced_pieces = 0
  for case in prepare_cases:
    lines = abc.clean(case["xml2abc_output"])
    reduced = abc.rest_reduce(lines)
    reduced_pieces += reduced != case["interleaved"]
    assert abc.unreduce(reduced) == case["interleaved"], case["source"]
    assert abc.unreduce(_with_stream_markers(reduced)) == case["interleaved"], case["source"]
    for key in ("C", "F#", "Bb"):
      expected = abc.interleave(abc.transpose(lines, key))
      assert abc.unreduce(case["augmented_rest_reduced"][key]) == expected, (case["source"], key)
  assert reduced_pieces == 2  # the chorale has a note in every bar of every voice


def test_unreduce_strips_the_originals_stream_markers(golden_dir):
  for case in json.loads((golden_dir / "cases.json").read_text())["cases"]:
    assert abc.unreduce(case["stream_text"]) == case["input_text"], case["name"]


GENERATED = ('%Baroque\n%Bach, Johann Sebastian\n%Keyboard\n%%score { 1 | ( 2 3 ) } 4\n'
             'L:1/8\nM:3/4\nK:C\nV:1 treble nm="Piano"\nV:2 bass\nV:3 bass\nV:4 treble nm="Flute"\n'
             '[r:0/3][V:1]|:abc def|[V:2]|:A,6|\n'
             '[r:1/2][V:1]abc d2e|[V:4]g6|\n'
             '[r:2/1][V:2][M:2/4]A,4:|\n'
             '[r:3/0]\n')


def test_unreduce_fills_every_declared_voice():
  header = GENERATED[:GENERATED.index("[r:")]
  assert abc.unreduce(GENERATED) == header + (
      # The first line's left barline goes to the missing voices too; V:3 shares a staff with
      # V:2 (the `( 2 3 )` group), so its rests are invisible `x`.
      "[V:1]|:abc def|[V:2]|:A,6|[V:3]|:x6|[V:4]|:z6|\n"
      "[V:1]abc d2e|[V:2]z6|[V:3]x6|[V:4]g6|\n"
      # An inline meter change: the rests take the length of the bar that is there.
      "[V:1]z4:|[V:2][M:2/4]A,4:|[V:3]x4:|[V:4]z4:|\n"
      # A line with no voice: rests everywhere, with the previous line's length and barline.
      "[V:1]z4:|[V:2]z4:|[V:3]x4:|[V:4]z4:|\n")


def test_unreduce_takes_the_most_common_bar_length_first_seen_on_ties():
  header = "L:1/8\nM:4/4\nK:C\nV:1\nV:2\nV:3\nV:4\n"
  assert abc.unreduce(header + "[V:1]a8|[V:2]a4|[V:3]a4|\n").endswith("[V:3]a4|[V:4]z4|\n")
  assert abc.unreduce(header + "[V:1]a6|[V:2]a4|\n").endswith("[V:3]z6|[V:4]z6|\n")
  # No bar to measure in the first line: the header's meter over unit length.
  assert abc.unreduce(header + '[V:1]"^x"|\n').endswith("[V:2]z8|[V:3]z8|[V:4]z8|\n")


def test_unreduce_round_trip_respells_whole_bar_rests():
  lines = ["L:1/8\n", "M:3/4\n", "K:C\n", "V:1 treble\n", "V:2 bass\n",
           "V:1\n", "z6|abc def|z6|ABC DEF|]\n", "V:2\n", "z6|z2 z4|z3 z3|A,6|]\n"]
  header = "".join(lines[:5])
  # All-rest bars are empty lines, the first one right after the header.
  assert abc.rest_reduce(lines) == header + "\n[V:1]abc def|\n\n[V:1]ABC DEF|][V:2]A,6|]\n"
  assert abc.interleave(lines) == header + (
      "[V:1]z6|[V:2]z6|\n[V:1]abc def|[V:2]z2 z4|\n[V:1]z6|[V:2]z3 z3|\n"
      "[V:1]ABC DEF|][V:2]A,6|]\n")
  assert abc.unreduce(abc.rest_reduce(lines)) == header + (
      "[V:1]z6|[V:2]z6|\n[V:1]abc def|[V:2]z6|\n[V:1]z6|[V:2]z6|\n"
      "[V:1]ABC DEF|][V:2]A,6|]\n")


@pytest.mark.parametrize("text, reason", [
    ("L:1/8\nK:C\nV:1\n", "no tune body"),
    ("L:1/8\nK:C\n[V:1]abc|\n", "declares no voice"),
    ("L:1/8\nK:C\nV:A\n[V:A]abc|\n", "must be numbers"),
    ("L:1/8\nK:C\nV:1\n[V:1]abc|[V:2]abc|\n", "V:2 is not declared"),
    ("L:1/8\nK:C\nV:1\n[V:1]abc|[V:1]abc|\n", "appears twice"),
    ("L:1/8\nK:C\nV:1\nabc [V:1]abc|\n", "text before the first voice"),
    ("L:1/8\nM:none\nK:C\nV:1\nV:2\n[V:1]!f!|\n", "no bar length is known"),
])
def test_unreduce_rejects_unusable_text(text, reason):
  with pytest.raises(abc.PieceError, match=reason):
    abc.unreduce(text)
