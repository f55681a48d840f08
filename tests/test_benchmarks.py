"""The benchmark scripts run as documented, on the smallest sizes (what they print is checked,
not how fast it is)."""

import json
import os
import pathlib
import re
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


def _run(args, timeout=900, devices=None, path=()):
  """A benchmark script as documented (from the repo root, the machine's own devices or
  `devices` forced host devices, `path` on its PYTHONPATH too), its output."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = os.pathsep.join(map(str, [BENCHMARKS.parent, *path]))
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


def _table_rows(out, first):
  """The rows of a printed table whose lines start with one of `first`, split on whitespace."""
  return [line.split() for line in out.splitlines() if line.split()[:1] and
          line.split()[0] in first]


@pytest.mark.slow  # a tiny step compiled for v5p-8 through libtpu and for h100x8
def test_compile_targets_prints_a_row_per_config_with_no_flops_for_scanned_layers(cuda_plugin):
  out = _run(["benchmarks/compile_targets.py", "--runs=pretrain.py:tiny", "--devices=v5p-8,h100x8",
              "--remat=false"], path=[cuda_plugin])
  rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
          if line.startswith("| pretrain.py:tiny")]
  assert [cells[:5] for cells in rows] == [["pretrain.py:tiny", "v5p-8", "-", "scanned", "1x4x1"],
                                           ["pretrain.py:tiny", "h100x8", "-", "scanned", "1x8x1"]]
  for cells in rows:
    assert float(cells[6]) >= 0 and cells[8].endswith("%")  # tiny: 0.0 GiB
    assert cells[9] == "n/a"  # a scanned layer counted once (TPU); no cost analysis (GPU)


@pytest.mark.slow  # tiny pre-training and DPO steps compiled for an H100
def test_gpu_roofline_counts_the_trainer_s_matmul_flops_and_splits_the_step(cuda_plugin):
  out = _run(["benchmarks/gpu_roofline.py", "--train=tiny:pretrain:bfloat16:2,tiny:dpo:float32:1",
              "--gpu=h100", "--top=3"], path=[cuda_plugin])
  heads = re.findall(r"^(tiny:\w+:\w+:\d): \d+ kernels, ([\d.e+-]+) TFLOP of matmuls \(the "
                     r"model's ([\d.e+-]+)\), roofline ([\d.]+) ms", out, re.M)
  assert [head[0] for head in heads] == ["tiny:pretrain:bfloat16:2", "tiny:dpo:float32:1"]
  for _, compiled, counted, _ in heads:
    # The model's matmuls and a few more: XLA multiplies the one-hot char and position inputs.
    assert float(counted) <= float(compiled) <= 1.05 * float(counted)
  groups = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(("| matmul |", "| matmul below ridge |", "| other |"))]
  assert [row[0] for row in groups] == ["matmul", "matmul below ridge", "other"] * 2
  for step in (groups[:3], groups[3:]):
    assert sum(float(row[-1].rstrip("%")) for row in step) == pytest.approx(100, abs=2)
  assert out.count("| op (longest in all) |") == 2


@pytest.mark.slow  # compiles the C++ kernels and one block's products
def test_cpu_matmul_throughput_prints_every_implementation_per_row_count():
  out = _run(["benchmarks/cpu_matmul_throughput.py", "--rows=1,2", "--layers=1", "--repeats=2"])
  rows = _table_rows(out, ("1", "2"))
  assert [row[0] for row in rows] == ["1", "2"]
  for row in rows:  # five implementations (ms and GB/s each), then the two ratios
    assert len(re.findall(r"GB/s", " ".join(row))) == 5
    assert row[-1].endswith("x") and row[-2].endswith("x")


@pytest.mark.slow  # the tiny model's step in both implementations
def test_model_throughput_compares_each_implementation_with_torch():
  out = _run(["benchmarks/model_throughput.py", "--sizes=tiny", "--repeats=1"])
  rows = [line.split(maxsplit=2) for line in out.splitlines() if line.startswith("tiny ")]
  assert [" ".join(row[1:2] + row[2].split()[:1]) for row in rows] == [
      "torch (sdpa)", "jax unpacked", "jax packed"]
  assert rows[0][2].split()[3] == "1.00x"


@pytest.mark.slow  # prepares four pieces of music21's corpus, builds shards, one small step
def test_data_throughput_prints_each_stage_and_the_ratio():
  out = _run(["benchmarks/data_throughput.py", "--pieces=4", "--batches=2"])
  for stage in ("prepare (all cores)", "shard build (1 process)", "loader (batch 8 x 2048)",
                "small model fwd+bwd"):
    assert any(line.startswith(stage) for line in out.splitlines()), stage
  assert "4 prepared, 0 failed" in out
  assert re.search(r"loader / model consumption = [\d,]+x", out)


@pytest.mark.slow  # the small model's sampler, PyTorch's loop for one patch, constrained too
def test_generate_throughput_prints_both_tables():
  out = _run(["benchmarks/generate_throughput.py", "--cases=short", "--batches=1",
              "--baseline-patches=1", "--torch-threads=2"])
  [row] = _table_rows(out, ("short",))
  assert row[1:3] == ["1", "float32"] and row[5].endswith("x")
  out = _run(["benchmarks/generate_throughput.py", "--only=constrained", "--batches=1"])
  [row] = _table_rows(out, ("1",))
  assert len(row) == 10 and row[3].endswith("x") and row[6].endswith("x")


@pytest.mark.slow  # tiny and small steps, and three DPO steps, on short pieces
def test_train_throughput_prints_every_step_and_the_dpo_comparison():
  # On a host with several devices (a GPU node's 8) the steps take the first, as PyTorch's does.
  out = _run(["benchmarks/train_throughput.py", "--steps=1", "--dpo-steps=1",
              "--small-patches=64", "--dpo-chosen=32", "--dpo-rejected=32"], devices=8)
  steps = [line[:48].strip() for line in out.splitlines()
           if line.startswith(("tiny pretrain", "small pretrain", "small DPO"))]
  assert steps == ["tiny pretrain (jax, packed)", "small pretrain (jax, packed)",
                   "small DPO jax: precomputed ref + char packing",
                   "small DPO jax: reference forward each step",
                   "small DPO torch: original step (eager attn)"]
  assert "DPO step per pair, same run" in out
