import io
import json
import re
import subprocess
import sys
import zipfile

import pytest

import notagen_reference as reference
from notagen_jax.data import abc
from notagen_jax.data import corpus
from notagen_jax.data import pipeline
from notagen_jax.data import preparation
from notagen_jax.data import tokenizer

FOLK = """X:1
T:A reel
M:4/4
L:1/8
K:G
|:GABc dedB|dedB dedB|c2ec B2dB|c2A2 A2BA:|
X:2
T:An air
M:3/4
L:1/4
K:D
d2 e|f2 g|a3|]
"""


def _bach_xml():
  data = (corpus.music21_corpus_root() / "bach" / "bwv1.6.mxl").read_bytes()
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    name = next(n for n in archive.namelist() if n.endswith(".xml") and not n.startswith("META"))
    return archive.read(name).decode("utf-8")


@pytest.fixture(scope="module")
def score_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("scores")
  xml = _bach_xml()
  (folder / "good.xml").write_text(xml)
  (folder / "tunes.abc").write_text(FOLK)
  (folder / "empty.xml").write_text("")
  (folder / "empty.abc").write_text("")
  (folder / "binary.mxl").write_bytes(bytes(range(256)) * 8)
  (folder / "truncated.xml").write_text(xml[:len(xml) // 2])
  # Drop the last measure of the first part: its voice then has one bar fewer than the others.
  first_part_end = xml.index("</part>")
  last_measure = xml.rindex("<measure", 0, first_part_end)
  (folder / "unequal.xml").write_text(xml[:last_measure] + xml[first_part_end:])
  (folder / "index.csv").write_text(
      "path,period,composer,instrumentation\ngood.xml,Baroque,\"Bach, Johann Sebastian\",Choral\n")
  return folder


def test_folder_preparation_records_failures_and_keeps_going(score_folder, tmp_path, golden_dir):
  sources = list(corpus.folder_sources(score_folder, str(score_folder / "index.csv")))
  report = preparation.prepare_corpus(sources, tmp_path, preparation.PrepareOptions(workers=1))
  failed = {f["piece_id"]: f["reason"] for f in report["failures"]}
  assert set(failed) == {"empty", "empty__1", "binary", "truncated", "unequal"}
  assert "different bar counts" in failed["unequal"]
  assert "empty file" in failed["empty"] and "empty file" in failed["empty__1"]
  assert report["prepared"] == 3 and report["failed"] == 5
  assert json.loads((tmp_path / "report.json").read_text())["failed"] == 5

  good = json.loads(preparation.piece_path(tmp_path, "good").read_text())
  assert good["prompt"] == "%Baroque\n%Bach, Johann Sebastian\n%Choral\n"
  assert good["original_key"] == "F" and list(good["augmented"]) == list(abc.KEYS)
  assert (tmp_path / "interleaved" / "good.abc").read_text() == good["interleaved"]
  # The original's preparation of the same chorale (from its .mxl).
  original = json.loads((golden_dir / "prepare_cases.json").read_text())["cases"][0]
  assert original["source"].endswith("bach/bwv1.6.mxl")
  assert good["interleaved"] == original["interleaved"]
  assert good["augmented"] == original["augmented_rest_reduced"]

  # Single-voice folk tunes are kept, as one voice.
  reel = json.loads(preparation.piece_path(tmp_path, "tunes__1").read_text())
  assert reel["prompt"] == "" and reel["instrumentation"] == "Melody"
  voices = set(re.findall(r"\[V:(\d+)\]", reel["interleaved"]))
  assert voices == {"1"}
  # Tokenizes cleanly: every line survives the bar split (bos, the lines, eos).
  patchilizer = tokenizer.Patchilizer(patch_length=10**6)
  for text in reel["augmented"].values():
    metadata, body = reference.training_lines(text)
    assert patchilizer.decode(patchilizer.encode_train(text)) == (
        chr(1) * 15 + "".join(metadata + body) + chr(1))


def test_rerun_skips_done_pieces(score_folder, tmp_path):
  sources = list(corpus.folder_sources(score_folder))
  options = preparation.PrepareOptions(workers=2)
  first = preparation.prepare_corpus(sources, tmp_path, options)
  assert first["processed_this_run"] == len(sources) == 8
  second = preparation.prepare_corpus(sources, tmp_path, options)
  assert second["processed_this_run"] == 0
  assert second["prepared"] == first["prepared"] and second["failed"] == first["failed"]
  retried = preparation.prepare_corpus(sources, tmp_path, preparation.PrepareOptions(
      workers=1, retry_failed=True))
  assert retried["processed_this_run"] == first["failed"]


def test_split_is_deterministic_and_close_to_the_fraction():
  ids = [f"piece{i}" for i in range(4000)]
  splits = [corpus.split_of(i, 0.1) for i in ids]
  assert splits == [corpus.split_of(i, 0.1) for i in ids]
  assert 0.08 < splits.count("eval") / len(ids) < 0.12


def test_abc_tunes_are_split():
  assert [t.splitlines()[0] for t in corpus.split_abc_tunes(FOLK)] == ["X:1", "X:2"]


def test_instrumentation_from_voice_names():
  header = lambda *names: "".join(f'V:{i + 1} treble nm="{n}"\n' for i, n in enumerate(names))
  assert corpus.instrumentation(header("Soprano", "Alto", "Tenor", "Bass")) == "Choral"
  assert corpus.instrumentation(header("Piano")) == "Keyboard"
  assert corpus.instrumentation(header("Voice", "Piano")) == "Art Song"
  assert corpus.instrumentation(header("Violin I", "Violin II", "Viola", "Cello")) == "Chamber"
  assert corpus.instrumentation("V:1 treble\n") == "Melody"


def test_missing_inputs_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    list(corpus.folder_sources(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="index"):
    corpus.load_metadata_index(tmp_path / "index.csv")
  bad = tmp_path / "index.jsonl"
  bad.write_text('{"path": "a.xml", "period": "Baroque"}\nnot json\n')
  with pytest.raises(ValueError, match="index.jsonl:2"):
    corpus.load_metadata_index(bad)


def test_prepare_entry_point_builds_shards_that_load(score_folder, tmp_path):
  out = tmp_path / "prepared"
  run = subprocess.run([sys.executable, "-m", "notagen_jax.prepare", f"--input={score_folder}",
                        f"--output={out}", "--workers=1", "--eval_fraction=0"],
                       capture_output=True, text=True, check=True)
  assert "prepared 3 of 8 pieces" in run.stdout and "failed 5" in run.stdout
  shards_dir = run.stdout.split("shards: ")[1].strip()
  iterator = pipeline.make_iterator(shards_dir, batch_size=3, patch_length=512,
                                    key_sampling="original", stream_cut=False, shuffle=False,
                                    num_threads=0)
  batch = next(iterator)
  pieces = [json.loads(p.read_text()) for p in (out / "pieces").rglob("*.json")]
  rows = sorted(ids[mask == 1].tolist() for ids, mask in zip(batch["patches"], batch["masks"]))
  expected = sorted(reference.encode_train(
      piece["prompt"] + piece["augmented"][abc.major_key(piece["original_key"])], 512)
      for piece in pieces)
  assert len(pieces) == 3 and rows == expected


def test_same_piece_in_two_formats_is_prepared_once():
  sources = [corpus.PieceSource("bach__bwv277", "/c/bach/bwv277.krn"),
             corpus.PieceSource("bach__bwv277", "/c/bach/bwv277.mxl"),
             corpus.PieceSource("bach__bwv278", "/c/bach/bwv278.krn")]
  kept, left_out = corpus.dedupe(sources)
  assert [s.path for s in kept] == ["/c/bach/bwv277.mxl", "/c/bach/bwv278.krn"]
  assert left_out == [{"file": "/c/bach/bwv277.krn", "piece_id": "bach__bwv277",
                       "same_piece_as": "/c/bach/bwv277.mxl"}]


def test_standard_abc_with_voice_tags_is_read_by_music21_not_deinterleaved(tmp_path):
  # Aird's airs write two-voice tunes as standard ABC whose lines start with `[V:1]`/`[V:2]`, four
  # bars a line and no `V:` in the header: not the interleaved form, so music21 reads them.
  book = corpus.file_sources(corpus.music21_corpus_root() / "airdsAirs" / "book6.abc")
  source = next(s for s in book if s.tune == 178)
  tune = corpus.abc_tune(source.path, source.tune)
  assert "\n[V:2] A>A|f3" in tune and not corpus.is_interleaved(tune)
  piece = preparation.prepare_piece(source, eval_fraction=0.1)
  assert piece["interleaved"].count("\n[V:1]") > 16
  # What prepare and generation write is still read as interleaved, and de-interleaved.
  assert corpus.is_interleaved(piece["interleaved"])
  header = "%Baroque\n%Bach, Johann Sebastian\n%Keyboard\nL:1/8\nM:3/4\nK:C\nV:1 treble\nV:2 bass\n"
  generated = header + ("[r:0/3][V:1]|:abc def|[V:2]|:A,6|\n[r:1/2][V:1]abc d2e|\n[r:2/1]\n"
                        "[r:3/0][V:1]c6:|[V:2]C,6:|\n")
  assert corpus.is_interleaved(generated)
  assert not corpus.is_interleaved(header + "[V:1]|:abc def|abc d2e|[V:2]|:A,6|z6|\n")
  (tmp_path / "generated.abc").write_text(generated)
  [read] = corpus.file_sources(tmp_path / "generated.abc")
  assert read.to_standard_abc() == corpus.deinterleave(generated)
