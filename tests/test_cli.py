"""Each entry point run as a user runs it, on a mistake: exit status 1, one last line on stderr
naming what is wrong, no traceback."""

import json
import pathlib
import subprocess
import sys

import pytest

from notagen_jax.data import abc
from notagen_jax.data import corpus

REPO = pathlib.Path(__file__).resolve().parents[1]
# A one-voice tune without V: lines, as people write ABC; then a second tune in the same file.
ONE_VOICE = "X:1\nT:A\nM:4/4\nL:1/8\nK:G\nGABc d2 e2|f2 g2 a4|]\n"
TWO_TUNES = ONE_VOICE + "X:2\nT:B\nM:3/4\nL:1/4\nK:D\nD E F|A2 d|]\n"


def run(verb, *args):
  return subprocess.run([sys.executable, "-m", f"notagen_jax.{verb}", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True)


def assert_error(result, verb, message):
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == f"{verb}: {message}"


@pytest.mark.parametrize("content, message", [
    ({"chosen": "X:1\nK:C\nabc|", "rejected": ["X:1\nK:C\ncba|"]},
     "'chosen' is not a list of ABC texts but \"X:1\\nK:C\\nabc|\""),
    ({"chosen": ["X:1\nK:C\nabc|"], "rejected": ["X:1\nK:C\ncba|", 3]},
     "rejected[1] is not an ABC text but 3"),
    ({"chosen": ["X:1\nK:C\nabc|"]}, "no 'rejected' key"),
])
def test_a_malformed_preference_file_names_the_file_key_and_entry(golden_dir, tmp_path, content,
                                                                  message):
  pairs = tmp_path / "pairs.json"
  pairs.write_text(json.dumps(content))
  result = run("train", "--config=configs/dpo.py:tiny", f"--workdir={tmp_path / 'run'}",
               f"--config.init_checkpoint={golden_dir / 'tiny.pth'}",
               f"--config.data.preference_file={pairs}")
  assert_error(result, "train", f"{pairs}: {message}")


def test_prepare_with_nothing_to_prepare_fails(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  assert_error(run("prepare", f"--input={empty}", f"--output={tmp_path / 'out'}"), "prepare",
               f"{empty}: no scores in it (files ending in .xml, .mxl, .musicxml, .krn, .abc)")
  assert not (tmp_path / "out").exists()
  scores = tmp_path / "scores"
  scores.mkdir()
  (scores / "tune.abc").write_text(ONE_VOICE)
  assert_error(run("prepare", f"--input={scores}", f"--output={tmp_path / 'out'}",
                   "--match=bach/bwv"), "prepare",
               f"--match=bach/bwv: none of the 1 scores in {scores} has it in its path")
  (scores / "tune.abc").write_text("X:1\nnot music\n")
  assert_error(run("prepare", f"--input={scores}", f"--output={tmp_path / 'out'}", "--workers=1"),
               "prepare", "none of the 1 pieces could be prepared (reasons in "
               f"{tmp_path / 'out'}/report.json)")


def test_loglik_scores_what_it_can_read_as_prepare_reads_it(golden_dir, tmp_path):
  tunes = tmp_path / "tunes.abc"
  tunes.write_text(TWO_TUNES)
  # The first tune as prepare's interleaved/ holds it: both must score the same.
  interleaved = tmp_path / "interleaved.abc"
  interleaved.write_text(abc.interleave(abc.clean(corpus.file_sources(tunes)[0].to_standard_abc())))
  broken = tmp_path / "broken.xml"
  broken.write_text("not xml")
  missing = tmp_path / "missing.abc"
  out = tmp_path / "scores.jsonl"
  result = run("loglik", f"--checkpoint={golden_dir / 'tiny.pth'}", f"--output={out}", missing,
               tunes, broken, interleaved)
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-2:] == [
      f"loglik: {missing}: not scored: no such file",
      f"loglik: {broken}: not scored: xml2abc failed: ParseError: syntax error: line 1, column 0"]
  rows = [json.loads(line) for line in result.stdout.splitlines()]
  assert [row["file"] for row in rows] == [f"{tunes}#1", f"{tunes}#2", str(interleaved)]
  assert {k: v for k, v in rows[0].items() if k != "file"} == {
      k: v for k, v in rows[2].items() if k != "file"}
  assert out.read_text() == result.stdout  # what was scored is kept
  assert_error(run("loglik", f"--checkpoint={golden_dir / 'tiny.pth'}", broken), "loglik",
               "nothing scored: no file could be read")


# With the demo's tests: one worker, so that the constrained sampler for one row is compiled once.
@pytest.mark.xdist_group("constrained_batch_1")
def test_continue_from_reads_the_file_as_prepare_does(golden_dir, tmp_path):
  tunes = tmp_path / "tunes.abc"
  tunes.write_text(TWO_TUNES)
  # One row, as the demo draws: one compiled sampler serves this test and the demo's.
  common = [f"--checkpoint={golden_dir / 'tiny.pth'}", f"--output={tmp_path / 'out'}",
            "--num_pieces=1", "--batch=1", "--max_patches=1", "--formats="]
  assert_error(run("generate", *common, f"--continue_from={tunes}"), "generate",
               f"{tunes} holds 2 tunes: choose one with --tune (1 to 2)")
  result = run("generate", *common, f"--continue_from={tunes}", "--tune=2")
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
  # The second tune, rewritten as prepare writes pieces (xml2abc's unit length 1/8, a V: line).
  piece = (tmp_path / "out" / "piece_00000.abc").read_text()
  assert piece.startswith("L:1/8\nM:3/4\nK:D\nV:1 treble \n[r:0/3][V:1]D2 E2 F2|\n"
                          "[r:1/2][V:1]A4 d2|]\n")


@pytest.mark.parametrize("args, message", [
    (["--meter=3/x"], "meter '3/x' is not a meter as ABC headers write it (e.g. 3/4, C, C| or "
     "none)"),
    (["--key=H"], "key 'H' is not a key as ABC headers write it (e.g. C, Eb, F#min, Ddor or "
     "none)"),
    (["--meter=3/4", "--voices=2", "--noconstrained"], "--meter and --voices fix header lines, "
     "which only constrained sampling can: drop --noconstrained"),
])
def test_a_header_flag_mistake_is_a_usage_error(tmp_path, args, message):
  assert_error(run("generate", "--checkpoint=unused.pth", f"--output={tmp_path}",
                   "--period=Baroque", "--composer=Bach, Johann Sebastian",
                   "--instrumentation=Choral", *args), "generate", message)


def test_a_continuation_keeps_its_own_header(tmp_path):
  tune = tmp_path / "tune.abc"
  tune.write_text(ONE_VOICE)
  assert_error(run("generate", "--checkpoint=unused.pth", f"--output={tmp_path / 'out'}",
                   f"--continue_from={tune}", "--meter=3/4", "--key=G", "--voices=2"),
               "generate", f"--meter=3/4: --continue_from={tune} has M:4/4; "
               f"--voices=2: --continue_from={tune} has 1 voice")


def test_a_partial_prompt_is_a_usage_error(tmp_path):
  assert_error(run("generate", "--checkpoint=unused.pth", f"--output={tmp_path}",
                   "--composer=Bach, Johann Sebastian"), "generate",
               "--composer given without --period and --instrumentation: a prompt is all three "
               "of period, composer and instrumentation")


@pytest.mark.parametrize("args, message", [
    (["--config=configs/pretrain.py:tiny", "--config.train.nope=1"],
     "--config.train.nope=1: the config has no field 'train.nope'"),
    (["--config=configs/pretrain.py:tiny", "--config.train.num_steps=many"],
     "--config.train.num_steps=many: invalid literal for int() with base 10: 'many'"),
    (["--config=configs/pretrain.py:tiny", "--config.model.dtype=float16", "--workdir=w",
      "--config.data.shards_dir=s"],
     "config.model.dtype: 'float16' is not one of ('float32', 'bfloat16')"),
    (["--config=configs/nope.py", "--config.train.num_steps=3"],
     "--config=configs/nope.py: no such file"),
    (["--config=configs/pretrain.py:huge"], "--config=configs/pretrain.py:huge: ValueError: size "
     "'huge' is not one of ('tiny', 'small', 'medium', 'large')"),
])
def test_a_config_mistake_is_one_line(args, message):
  assert_error(run("train", *args), "train", message)


def test_library_logs_are_quiet_unless_asked_for(tmp_path):
  scores = tmp_path / "scores"
  scores.mkdir()
  (scores / "tune.abc").write_text(ONE_VOICE)
  quiet = run("prepare", f"--input={scores}", f"--output={tmp_path / 'quiet'}", "--workers=1",
              "--eval_fraction=0")
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  assert "shards: " in quiet.stdout and "dataset_builder.py" not in quiet.stderr
  assert "Generating splits" not in quiet.stderr  # TFDS's progress bars; ours stays
  assert "prepare: 100%" in quiet.stderr
  verbose = run("prepare", f"--input={scores}", f"--output={tmp_path / 'verbose'}",
                "--workers=1", "--eval_fraction=0", "--verbosity=0")
  assert "dataset_builder.py" in verbose.stderr and "Generating splits" in verbose.stderr


@pytest.mark.parametrize("verb, args, message", [
    ("tokenize", ["missing.abc"], f"{REPO / 'missing.abc'} is not a file"),
    ("port", ["to-torch", "configs", "out.pth"],
     "configs: not a checkpoint (a params dir, a NotaGen .pth/.pt/.bin/.safetensors "
     "or a training run)"),
    ("plan", ["--config=configs/pretrain.py:tiny", "--mesh=1,x"],
     "mesh '1,x': expected data,fsdp,tensor sizes, e.g. 2,4,1"),
    ("sweep", ["--config=configs/scaling.py:cpu", "--config.sweep.budgets=-1", "--workdir=w"],
     "config.sweep.budgets: (-1,): needs at least two distinct budgets > 0 (model FLOPs)"),
    ("clamp_dpo", ["--config=configs/clamp_dpo.py:tiny", "--workdir=w"],
     "config field init_checkpoint: the first policy is needed"),
    ("generate", ["--checkpoint=x.pth", "--output=o", "--formats=pdf", "--continue_from=a.abc"],
     "--formats=['pdf']: takes xml, mid, both or nothing (comma-separated)"),
])
def test_every_entry_point_reports_a_mistake_in_one_line(verb, args, message):
  assert_error(run(verb, *args), verb, message)
