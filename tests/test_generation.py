import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

import notagen_reference as reference
from notagen_jax import checkpoint
from notagen_jax import generation
from notagen_jax import sampling
from notagen_jax.data import abc
from notagen_jax.data import corpus
from notagen_jax.data import tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
# The summary's counts of written files (tests/test_metrics.py checks the metrics it adds).
COUNTS = ("pieces", "complete", "unreduced_share", "musicxml_share", "midi_share", "chars")


@pytest.fixture(scope="module")
def cases(golden_dir):
  return json.loads((golden_dir / "cases.json").read_text())["cases"]


def _result(text, index=0):
  return sampling.Result(index, "", text, True, "", 10, 0, 1.0)


def test_a_real_piece_is_written_in_every_format(cases, tmp_path):
  written = generation.write_piece(_result(cases[0]["stream_text"]), tmp_path, "bwv")
  assert written.errors == {}
  assert set(written.files) == {"abc", "unreduced", "xml", "mid"}
  unreduced = (tmp_path / "bwv.unreduced.abc").read_text()
  assert unreduced.startswith("X:1\n") and "[r:" not in unreduced
  assert unreduced[len("X:1\n"):] == abc.unreduce(cases[0]["stream_text"])
  assert (tmp_path / "bwv.xml").read_text().startswith("<?xml")
  assert (tmp_path / "bwv.mid").read_bytes()[:4] == b"MThd"


def test_repeats_music21_cannot_unroll_play_as_written_in_the_midi(tmp_path):
  """A piece stopped inside a repeat: music21 refuses to unroll it; the MIDI plays it through."""
  text = ("%Baroque\n%Bach, Johann Sebastian\n%Keyboard\nL:1/4\nM:2/4\nK:C\nV:1 treble\n"
          "[r:0/2][V:1]|:C D|\n[r:1/1][V:1]E F::\n[r:2/0][V:1]G2|\n")
  written = generation.write_piece(_result(text), tmp_path, "open")
  assert written.errors == {}
  import music21  # pylint: disable=import-outside-toplevel
  score = music21.converter.parse(tmp_path / "open.mid")
  assert [n.name for n in score.flatten().notes] == ["C", "D", "E", "F", "G"]


def test_a_broken_piece_keeps_its_abc_and_names_the_failure(tmp_path):
  written = generation.write_piece(_result("%Baroque\nnot music at all\n"), tmp_path, "bad")
  assert (tmp_path / "bad.abc").read_text() == "%Baroque\nnot music at all\n"
  assert set(written.files) == {"abc"}
  assert written.errors == {"unreduced": "no tune body (no line contains [V:)"}


def test_prompts_are_checked_against_known_combinations():
  known = {("Baroque", "Bach, Johann Sebastian", "Choral"), ("Classical", "Mozart", "Keyboard")}
  assert generation.prompt_text("Baroque", "Bach, Johann Sebastian", "Choral", known) == (
      "%Baroque\n%Bach, Johann Sebastian\n%Choral\n")
  with pytest.raises(ValueError, match="close matches: Baroque / Bach, Johann Sebastian / Choral"):
    generation.prompt_text("Baroque", "Bach, J. S.", "Choral", known)
  with pytest.raises(ValueError, match="needs period, composer and instrumentation"):
    generation.prompt_text("Baroque", "", "Choral")


def test_continuation_prompt_from_musicxml_is_the_training_form(golden_dir):
  source = next(s for s in corpus.music21_sources() if s.path.endswith("bwv1.6.mxl"))
  path = corpus.music21_corpus_root() / source.path
  prompt = generation.continuation_prompt(path, head="%Baroque\n", bars=3, extra_lines=5)
  # The original's training text of this chorale in its own key (F), its first three body lines
  # marked as three of eight.
  case = json.loads((golden_dir / "prepare_cases.json").read_text())["cases"][0]
  assert case["source"].endswith("bach/bwv1.6.mxl") and case["original_key"] == "F"
  lines = case["augmented_rest_reduced"]["F"].splitlines(keepends=True)
  split = next(i for i, line in enumerate(lines) if "[V:" in line)
  assert prompt == "%Baroque\n" + "".join(lines[:split]) + "".join(
      f"[r:{i}/{7 - i}]{line}" for i, line in enumerate(lines[split:split + 3]))
  ids, prefix, in_body = sampling.split_prompt(tokenizer.Patchilizer(), prompt)
  # As the original's encode_generate: the last bar's patch stays open for the model to go on.
  expected = reference.encode_generate(prompt, 2048)
  assert in_body and len(expected[-1]) < 16
  assert ids.tolist() == expected[:-1] and prefix.tolist() == expected[-1]
  assert prefix[-1] == ord("\n")


def test_generate_writes_every_piece_and_a_record(golden_dir, tmp_path):
  model = checkpoint.load_model(golden_dir / "tiny.pth")
  settings = sampling.Settings(max_patches=6)
  written = generation.generate(model, ["%Baroque\n%Bach, Johann Sebastian\n%Choral\n"] * 3,
                                tmp_path, settings=settings, batch=2, progress=False,
                                perplexity=True)
  assert [w.index for w in written] == [0, 1, 2]
  records = [json.loads(line) for line in (tmp_path / "pieces.jsonl").read_text().splitlines()]
  assert sorted(records, key=lambda r: r["index"]) == [dataclasses.asdict(w) for w in written]
  texts = [pathlib.Path(w.files["abc"]).read_text() for w in written]
  for w, text in zip(written, texts):
    assert text.startswith("%Baroque\n%Bach, Johann Sebastian\n%Choral\n")
    assert (w.patches, w.ok, w.reason, w.chars) == (6, True, "stopped after 6 patches", len(text))
    # Six patches of a random tiny model are noise with no `[V:` line: only the raw ABC is
    # written, and the failed conversion is named.
    assert set(w.files) == {"abc"}
    assert w.errors == {"unreduced": "no tune body (no line contains [V:)"}
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "piece_00000.abc", "piece_00000.json", "piece_00001.abc", "piece_00001.json",
      "piece_00002.abc", "piece_00002.json", "pieces.jsonl"]
  assert [generation.read_record(tmp_path / f"piece_0000{i}.json") for i in range(3)] == written
  summary = generation.summary(written)
  assert {k: summary[k] for k in COUNTS} == {"pieces": 3, "complete": 3, "unreduced_share": 0.0,
                                             "musicxml_share": 0.0, "midi_share": 0.0,
                                             "chars": sum(map(len, texts))}
  # Noise has no bars to align; the model still scores every character after the first patch.
  assert (summary["bars"], summary["bar_alignment_error"], summary["aligned_share"]) == (0, None, 0)
  assert all(w.metrics.scored_chars > 0 for w in written) and summary["perplexity"] > 1


def test_a_resumed_run_draws_only_the_missing_pieces_and_ends_as_an_uninterrupted_one(
    golden_dir, tmp_path, monkeypatch):
  model = checkpoint.load_model(golden_dir / "tiny.pth")
  prompts = ["%Baroque\n%Bach, Johann Sebastian\n%Choral\n"] * 4
  kwargs = dict(settings=sampling.Settings(max_patches=4), batch=2, progress=False, formats=())
  whole = generation.generate(model, prompts, tmp_path / "whole", **kwargs)
  # Stopped with piece 2 written (its files, then its record), as by a preempted process.
  stopped = tmp_path / "stopped"
  stopped.mkdir()
  for path in (tmp_path / "whole").glob("piece_00002.*"):
    shutil.copy(path, stopped / path.name)
  drawn = []
  run = sampling.Sampler.run
  monkeypatch.setattr(sampling.Sampler, "run", lambda self, prompts, indices, **kw: (
      drawn.extend(indices), run(self, prompts, indices=indices, **kw))[1])
  resumed = generation.generate(model, prompts, stopped, resume=True, **kwargs)
  assert drawn == [0, 1, 3]
  texts = lambda written: [pathlib.Path(w.files["abc"]).read_text() for w in written]
  assert texts(resumed) == texts(whole) and len(set(texts(whole))) == 4
  assert (stopped / "pieces.jsonl").read_text().count("\n") == 4


def test_summary_counts_shares_of_converted_pieces():
  def piece(index, ok, formats, chars):
    files = {"abc": f"{index}.abc", **{f: f"{index}.{f}" for f in formats}}
    return generation.Written(index, str(index), ok, "", 4, chars, 1.0, files, {})
  written = [piece(0, True, ["unreduced", "xml", "mid"], 100),
             piece(1, False, ["unreduced", "xml"], 20),
             piece(2, True, [], 7)]
  summary = generation.summary(written)
  assert {k: summary[k] for k in COUNTS} == {"pieces": 3, "complete": 2, "unreduced_share": 0.667,
                                             "musicxml_share": 0.667, "midi_share": 0.333,
                                             "chars": 127}
  summary = generation.summary([])
  assert {k: summary[k] for k in COUNTS} == {"pieces": 0, "complete": 0, "unreduced_share": 0.0,
                                             "musicxml_share": 0.0, "midi_share": 0.0, "chars": 0}


# The entry point's tests draw with the same compiled sampler (two rows, bfloat16 weights; how many
# patches is the host's business): one worker runs them in turn, the second reads it back from
# the run's compilation cache (conftest.py).
@pytest.mark.xdist_group("constrained_batch_2_bfloat16")
def test_generate_entry_point(golden_dir, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "notagen_jax.generate", f"--checkpoint={golden_dir / 'tiny.pth'}",
       f"--output={tmp_path}", "--period=Baroque", "--composer=Bach, Johann Sebastian",
       "--instrumentation=Choral", "--num_pieces=2", "--batch=2", "--max_patches=4",
       "--formats=", "--weights_dtype=bfloat16"], cwd=REPO, capture_output=True, text=True, check=True)
  summary = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
  assert summary["pieces"] == 2 and summary["perplexity"] > 1  # scored by default
  # Stopped past four patches at the end of a body line (constrained, the default): whole, so
  # each un-reduces.
  assert sorted(p.name for p in tmp_path.glob("*.abc")) == [
      "piece_00000.abc", "piece_00000.unreduced.abc", "piece_00001.abc",
      "piece_00001.unreduced.abc"]
  for path in tmp_path.glob("piece_?????.abc"):
    lines = path.read_text().split("\n")
    assert lines[-1] == "" and lines[-2].startswith("[r:0/"), path


def _header_lines(text):
  """The lines before the first body line (all of them when it has none)."""
  lines = text.splitlines()
  body = tokenizer.body_index(lines, "starts_marker")
  return lines[:body] if body >= 0 else lines


@pytest.mark.xdist_group("constrained_batch_2_bfloat16")
def test_generate_fixes_the_header_lines_it_is_given(golden_dir, tmp_path):
  subprocess.run(
      [sys.executable, "-m", "notagen_jax.generate", f"--checkpoint={golden_dir / 'tiny.pth'}",
       f"--output={tmp_path}", "--period=Baroque", "--composer=Bach, Johann Sebastian",
       "--instrumentation=Choral", "--num_pieces=2", "--batch=2", "--max_patches=16",
       "--formats=", "--noperplexity", "--seed=3", "--meter=3/4", "--key=Eb", "--voices=2",
       "--weights_dtype=bfloat16"],
      cwd=REPO, capture_output=True, text=True, check=True)
  pieces = sorted(tmp_path.glob("piece_?????.abc"))  # as generated (raw)
  assert len(pieces) == 2
  for path in pieces:
    header = _header_lines(path.read_text())
    assert [line for line in header if line.startswith(("M:", "K:"))] == ["M:3/4", "K:Eb"], path
    voices = [line.split()[0] for line in header if line.startswith("V:")]
    assert voices == ["V:1", "V:2"], path
