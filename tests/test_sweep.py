"""Scaling sweeps on real shards: runs that hit their FLOP budgets, the CSV, resuming, the plot,
the fit, the checks; the 2 x 2 grid through the command line is a slow test."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from notagen_jax import scaling
from notagen_jax import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def scaling_config(variant="smoke", **overrides):
  """configs/scaling.py:variant, with `section__field=value` overrides."""
  spec = importlib.util.spec_from_file_location("scaling_config", REPO / "configs" / "scaling.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(variant)
  for key, value in overrides.items():
    section, _, field = key.rpartition("__")
    (c[section] if section else c)[field] = value
  return c


def _env():
  # One CPU device: the entry point runs as a user would run it.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu")
  return env


@pytest.fixture(scope="module")
def finished(corpus_shards, tmp_path_factory):
  """One model at the smoke grid's two budgets: two real runs (the 2 x 2 grid is a slow test)."""
  c = scaling_config(data__shards_dir=str(corpus_shards), sweep__models=("1x1x64",))
  sweep = scaling.plan_sweep(c, tmp_path_factory.mktemp("sweep"))
  return sweep, scaling.run_sweep(sweep)


@pytest.mark.slow  # a minute or more: runs in CI's second pass
def test_each_run_trains_to_its_budget_and_lands_in_the_csv(finished):
  sweep, result = finished
  rows = scaling.read_rows(result.csv_path)
  assert [r["run"] for r in rows] == [run.name for run in sweep.runs] == [
      "1x1x64_C1e10", "1x1x64_C2e10"]
  assert set(rows[0]) == set(scaling.FIELDS)
  for row, run in zip(rows, sweep.runs):
    cfg = trainer.model_config(scaling.run_config(sweep.config, run, 2))
    full_step = 3 * 8 * trainer.forward_flops(cfg, 32)
    # The trainer counted what the plan counted, and the last step is the one that crossed.
    assert row["flops"] == pytest.approx(sweep.plans[run.name].flops, rel=1e-5)
    assert row["flops"] - full_step < row["budget_flops"] <= row["flops"]
    assert row["steps"] >= sweep.config.sweep.min_steps
    assert row["chars_seen"] > row["patches_seen"] > row["steps"] * 8
    assert row["params"] == 242_688
    assert 2.0 < row["eval_loss"] < np.log(128)  # below a uniform guess over the 128 chars
    assert row["eval_bits_per_char"] == pytest.approx(row["eval_loss"] / np.log(2), rel=1e-4)
    assert row["wall_s"] > 0
    assert (sweep.workdir / run.name / trainer.FINAL_PARAMS).exists()
  assert rows[1]["eval_loss"] < rows[0]["eval_loss"]  # more compute, lower loss
  assert [r["run"] for r in result.frontier] == [r["run"] for r in rows]
  # Two points: the log-log line through them exactly.
  (c0, l0), (c1, l1) = ((r["flops"], r["eval_loss"]) for r in result.frontier)
  b = math.log(l0 / l1) / math.log(c1 / c0)
  assert (result.law.a, result.law.b, result.law.c) == (
      pytest.approx(l0 * c0**b, rel=1e-6), pytest.approx(b, rel=1e-6), 0.0)
  png = result.png_path.read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.slow  # a minute or more: runs in CI's second pass
def test_a_rerun_trains_only_what_the_csv_lacks(finished, monkeypatch):
  sweep, result = finished

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(trainer, "train_and_evaluate", no_training)
  again = scaling.plan_sweep(sweep.config, sweep.workdir)
  assert again.plans == {}
  rerun = scaling.run_sweep(again)
  assert [r["run"] for r in rerun.rows] == [r["run"] for r in result.rows]
  assert [r["eval_loss"] for r in rerun.rows] == pytest.approx(
      [r["eval_loss"] for r in result.rows], rel=1e-5)
  assert len(scaling.read_rows(result.csv_path)) == 2

  grown = scaling_config(data__shards_dir=sweep.config.data.shards_dir,
                         sweep__models=("1x1x64", "2x1x64"), sweep__budgets=(1e10, 2e10, 3e10))
  assert set(scaling.plan_sweep(grown, sweep.workdir).plans) == {
      "1x1x64_C3e10", "2x1x64_C1e10", "2x1x64_C2e10", "2x1x64_C3e10"}
  other = scaling_config(data__shards_dir=sweep.config.data.shards_dir,
                         sweep__models=("1x1x64",), optimizer__learning_rate=5e-4)
  with pytest.raises(ValueError, match="optimizer.learning_rate"):
    scaling.plan_sweep(other, sweep.workdir)


@pytest.mark.slow
def test_two_by_two_grid_from_the_command_line(corpus_shards, tmp_path):
  command = [sys.executable, "-m", "notagen_jax.sweep", "--config=configs/scaling.py:smoke",
             f"--workdir={tmp_path}", f"--config.data.shards_dir={corpus_shards}"]
  out = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                       check=True).stdout
  print(out)
  names = ["1x1x64_C1e10", "2x1x64_C1e10", "1x1x64_C2e10", "2x1x64_C2e10"]
  rows = scaling.read_rows(tmp_path / scaling.CSV_NAME)
  assert [r["run"] for r in rows] == names
  assert rows[1]["params"] > rows[0]["params"] == rows[2]["params"]
  table = out[out.index("eval loss"):]
  starred = {line.split()[0] for line in table.splitlines() if line.endswith(" *")}
  assert starred == {min(rows[:2], key=lambda r: r["eval_loss"])["run"],
                     min(rows[2:], key=lambda r: r["eval_loss"])["run"]}
  assert "fit on the compute-optimal frontier: L(C) = " in out
  assert f"csv: {tmp_path / scaling.CSV_NAME}" in out
  assert (tmp_path / scaling.PNG_NAME).read_bytes().startswith(b"\x89PNG")
  again = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                         check=True).stdout
  assert [line.split() for line in again.splitlines()[1:5]] == [[n, "finished"] for n in names]
  assert len(scaling.read_rows(tmp_path / scaling.CSV_NAME)) == 4


def test_entry_point_stops_on_a_wrong_value_before_any_work(tmp_path):
  bad = subprocess.run(
      [sys.executable, "-m", "notagen_jax.sweep", "--config=configs/scaling.py:smoke",
       f"--workdir={tmp_path / 'sweep'}", "--config.sweep.budgets=1e10,-1e10"],
      cwd=REPO, env=_env(), capture_output=True, text=True)
  assert bad.returncode != 0 and "config.sweep.budgets" in bad.stderr
  assert not (tmp_path / "sweep").exists()


def test_a_budget_too_small_for_min_steps_stops_before_training(corpus_shards, tmp_path,
                                                                monkeypatch):
  monkeypatch.setattr(trainer, "train_and_evaluate", None)
  c = scaling_config(data__shards_dir=str(corpus_shards), sweep__budgets=(1e9, 3e10))
  with pytest.raises(ValueError, match="sweep.min_steps"):
    scaling.plan_sweep(c, tmp_path / "sweep")
  assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("field, value, message", [
    ("models", (), "is empty"),
    ("models", ("tiny", "2x1x128"), "twice"),
    ("models", ("2x128",), "PxCxH"),
    ("models", ("2x1x100",), "head size"),
    ("budgets", (1e12,), "two distinct"),
    ("budgets", (1e12, 0.0), "two distinct"),
    ("fit", "cubic", "one of"),
    ("fit", "offset", "at least 4 budgets"),
    ("warmup_fraction", 1.0, "not in"),
    ("min_steps", 1, ">= 2"),
])
def test_validate_names_the_wrong_field(field, value, message):
  c = scaling_config(data__shards_dir="/nonexistent", workdir="/tmp/x",
                     **{f"sweep__{field}": value})
  with pytest.raises(ValueError, match=f"config.sweep.{field}: .*{message}"):
    scaling.validate(c)


def test_shapes():
  assert scaling.parse_shape("tiny") == scaling.Shape("tiny", 2, 1, 128)
  assert scaling.parse_shape("3x2x192") == scaling.Shape("3x2x192", 3, 2, 192)
  assert scaling.Run(scaling.parse_shape("3x2x192"), 2.5e12).name == "3x2x192_C2.5e12"
  with pytest.raises(ValueError, match="config.sweep.models: .*PxCxH"):
    scaling.parse_shape("3x2")
  with pytest.raises(ValueError, match="head size"):
    scaling.parse_shape("1x1x100")


def test_power_law_fit_recovers_known_exponents():
  compute = np.geomspace(1e12, 1e16, 8)
  pure = scaling.fit_power_law(compute, 30.0 * compute**-0.05)
  assert (pure.a, pure.b, pure.c) == (pytest.approx(30.0, rel=1e-6), pytest.approx(0.05, rel=1e-6),
                                      0.0)
  noise = np.exp(np.random.default_rng(0).normal(0, 0.01, compute.shape))
  assert scaling.fit_power_law(compute, 30.0 * compute**-0.05 * noise).b == pytest.approx(
      0.05, abs=0.005)
  offset = scaling.fit_power_law(compute, 40.0 * compute**-0.12 + 1.3, offset=True)
  assert (offset.a, offset.b, offset.c) == (pytest.approx(40.0, rel=1e-3),
                                            pytest.approx(0.12, rel=1e-3),
                                            pytest.approx(1.3, rel=1e-3))
  with pytest.raises(ValueError, match="at least 3"):
    scaling.fit_power_law(compute[:2], [3.0, 2.0], offset=True)


def test_frontier_is_the_lowest_loss_per_budget():
  rows = [{"run": "a1", "budget_flops": 1e12, "eval_loss": 3.0},
          {"run": "b1", "budget_flops": 1e12, "eval_loss": 3.2},
          {"run": "a2", "budget_flops": 3e12, "eval_loss": 2.9},
          {"run": "b2", "budget_flops": 3e12, "eval_loss": 2.7}]
  assert [r["run"] for r in scaling.frontier(rows[::-1])] == ["a1", "b2"]


def test_the_documented_cpu_sweep_can_resume_over_its_recorded_results():
  """docs/scaling.md's command writes into docs/scaling: the settings recorded there must still be
  what configs/scaling.py:cpu gives, or the sweep refuses to run."""
  c = scaling_config("cpu", data__shards_dir="runs/scaling_data/shards/notagen_shards/p16_prompt/"
                     "1.0.0", sweep__output_dir="docs/scaling", workdir="runs/scaling")
  recorded = json.loads((REPO / "docs" / "scaling" / scaling.SETTINGS_NAME).read_text())
  current = json.loads(c.to_json_best_effort())
  assert scaling._changed(scaling._settings(recorded), scaling._settings(current)) == []
