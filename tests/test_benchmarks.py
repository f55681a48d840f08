"""The benchmark scripts run as documented, on the smallest sizes (what they print is checked,
not how fast it is)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow  # about a minute: two train steps and two samplers compile
def test_accelerator_throughput_prints_a_row_for_each_spec(tmp_path):
  out = tmp_path / "rows.jsonl"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a GPU host
  done = subprocess.run(
      [sys.executable, "accelerator_throughput.py", "--train=tiny:pretrain:float32:2,tiny:dpo:"
       "float32:1,tiny:pretrain:float64:1", "--sample=tiny:float32:2:free", "--steps=1",
       f"--out={out}"], cwd=BENCHMARKS, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["row"] for r in rows] == ["machine", "peak", "train", "train", "error", "sample"]
  assert rows[0]["platform"] == "cpu" and rows[0]["local_devices"] == 1
  assert rows[1]["bf16_tflops"] is None  # measured on an accelerator only
  for row in rows[2:4]:
    assert row["step_s"] > 0 and row["chars_per_s"] > 0 and row["tflops_per_device"] >= 0
  assert rows[3]["rows"] == 1  # one pair
  # A bad spec reports its error and the rows after it still run.
  assert rows[4]["spec"] == "tiny:pretrain:float64:1" and "float64" in rows[4]["error"]
  assert rows[5]["pieces_per_s"] > 0 and rows[5]["chars_per_s"] > 0


def _run(args, timeout=900):
  """A benchmark script as documented (from the repo root), its output."""
  env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
  done = subprocess.run([sys.executable, *args], cwd=BENCHMARKS.parent, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


@pytest.mark.slow  # about two minutes: two samplers compile
def test_well_formed_prints_both_modes_and_the_constrained_pieces_are_whole():
  out = _run(["benchmarks/well_formed.py", "--random=256,1,1,64", "--pieces=4", "--batch=2",
              "--max_patches=8"])
  rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
          if line.startswith(("unconstrained ", "constrained "))}
  assert sorted(rows) == ["constrained", "unconstrained"]
  unreduced, musicxml, midi, bae = rows["constrained"][:4]
  assert (float(unreduced), float(musicxml), float(midi), float(bae)) == (1.0, 1.0, 1.0, 0.0)
  assert "#   piece" not in out  # no constrained piece failed


@pytest.mark.slow  # about a minute: prepares a handful of music21's sources
def test_corpus_admitted_reads_every_prepared_piece(tmp_path):
  out = _run(["benchmarks/corpus_admitted.py", "--stride=2500", f"--work={tmp_path}",
              "--workers=1"])
  summary = out.strip().splitlines()[-1]
  admitted, total = (int(n.replace(",", "")) for n in summary.split(" pieces")[0].split(" of "))
  assert total == len(list(tmp_path.glob("pieces/*/*.json"))) > 0
  assert admitted == total - sum(" then " in line for line in out.splitlines())


@pytest.mark.slow  # about two minutes: five processes start and compile their samplers
def test_generate_scaling_draws_the_same_pieces_in_every_layout():
  out = _run(["benchmarks/generate_scaling.py", "--pieces=8", "--batch=4", "--max_patches=4",
              "--layouts=1x1,1x2,2x1"])
  lines = out.strip().splitlines()
  assert lines[0].startswith("# ") and "tiny model, 8 pieces of 4 patches" in lines[0]
  rows = [line.split() for line in lines[2:]]
  assert [row[:2] for row in rows] == [["1", "1"], ["1", "2"], ["2", "1"]]
  assert all(float(row[2]) > 0 for row in rows)
  assert len({(row[4], row[5]) for row in rows}) == 1  # the same characters, the same texts
