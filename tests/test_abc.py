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
  body = abc.clean(text)[-1]
  assert '"^cresc."' in body and "xxxx" not in body and '""' not in body and "a|b" not in body


def test_major_key_and_semitones():
  assert abc.major_key("Am") == "C" and abc.major_key("Ddor") == "C" and abc.major_key("none") == "C"
  assert [abc.key_semitone(k) for k in ("Cb", "C#", "Db", "F#", "Gb")] == [11, 1, 1, 6, 6]
