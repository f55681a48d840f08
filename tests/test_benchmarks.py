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
