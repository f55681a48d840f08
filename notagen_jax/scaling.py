"""Compute-budget scaling sweeps: a grid of model shapes x FLOP budgets through the real trainer.

`plan_sweep(config, workdir)` checks every value, reads the runs already finished (the CSV), and
finds each remaining run's step count: the first step at which the FLOPs of the run's own batches,
counted by `trainer.step_flops` (3 x the forward over real patches), reach the budget. Nothing is
trained until every run has a plan. `run_sweep(sweep)` trains each remaining run with
`trainer.train_and_evaluate` in WORKDIR/<run>, with warmup and a cosine decay that ends at its last
step, and appends its row to the CSV as it finishes: a rerun skips the finished runs (an
unfinished one resumes from its checkpoint if SIGTERM left one, else starts over). It then takes
the compute-optimal frontier (the lowest final eval loss at each budget), fits L(C) = a C^-b to it
(or a C^-b + c with `sweep.fit = 'offset'`), and plots eval loss against compute, per model, with
the frontier and the fit. A CSV holds one setting: between reruns only the grid and the analysis
may change (sweep_config.json beside it records the config).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
import types
from typing import Callable, Sequence

import ml_collections
import numpy as np
from absl import logging
from etils import epath
from matplotlib import figure

from notagen_jax import config as config_lib
from notagen_jax import model as model_lib
from notagen_jax import planning
from notagen_jax import storage
from notagen_jax import trainer
from notagen_jax.data import shards

CSV_NAME = "scaling.csv"
PNG_NAME = "scaling.png"
SETTINGS_NAME = "sweep_config.json"
# train_loss is the mean over the run's last train.log_every steps; eval_loss (nats per char) and
# eval_bits_per_char are the final eval's.
FIELDS = ("run", "model", "patch_layers", "char_layers", "hidden", "params", "budget_flops",
          "steps", "flops", "patches_seen", "chars_seen", "train_loss", "eval_loss",
          "eval_bits_per_char", "wall_s")
_INT_FIELDS = {"patch_layers", "char_layers", "hidden", "params", "steps", "patches_seen",
               "chars_seen"}
_STR_FIELDS = {"run", "model"}
FITS = ("power", "offset")
# Fields that only choose the grid or the analysis: changing them keeps finished runs valid.
_GRID_FIELDS = ("models", "budgets", "fit", "output_dir")


@dataclasses.dataclass(frozen=True)
class Shape:
  """A model shape: a size of model.SIZES, or 'PxCxH' (patch layers x char layers x hidden)."""
  name: str
  patch_layers: int
  char_layers: int
  hidden: int


def parse_shape(text: str) -> Shape:
  try:
    return Shape(text, *model_lib.shape_of(text))
  except ValueError as error:
    raise ValueError(f"config.sweep.models: {error}") from None


@dataclasses.dataclass(frozen=True)
class Run:
  shape: Shape
  budget: float  # model FLOPs

  @property
  def name(self) -> str:
    return f"{self.shape.name}_C{self.budget:.3g}".replace("+", "")


def expand_grid(c: ml_collections.ConfigDict) -> list[Run]:
  """Every (shape, budget) pair, the smallest budgets first so the frontier fills in early."""
  shapes = [parse_shape(m) for m in c.sweep.models]
  return [Run(shape, float(budget)) for budget in sorted(c.sweep.budgets) for shape in shapes]


def _check(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ValueError(f"config.{field}: {message}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first wrong field of the sweep or of the runs it makes."""
  _check("sweep" in c, "sweep", "missing: use configs/scaling.py")
  s = c.sweep
  _check(len(s.models) > 0, "sweep.models", "is empty")
  dims = [(x.patch_layers, x.char_layers, x.hidden) for x in map(parse_shape, s.models)]
  _check(len(set(dims)) == len(dims), "sweep.models", f"{tuple(s.models)} names a shape twice")
  budgets = [float(b) for b in s.budgets]
  _check(len(set(budgets)) >= 2 and min(budgets) > 0, "sweep.budgets",
         f"{tuple(s.budgets)}: needs at least two distinct budgets > 0 (model FLOPs)")
  _check(0 <= s.warmup_fraction < 1, "sweep.warmup_fraction", f"{s.warmup_fraction} not in [0, 1)")
  _check(s.min_steps >= 2, "sweep.min_steps", f"{s.min_steps} must be >= 2")
  _check(s.fit in FITS, "sweep.fit", f"{s.fit!r} is not one of {FITS}")
  _check(s.fit != "offset" or len(set(budgets)) >= 4, "sweep.fit",
         "'offset' fits 3 parameters to the frontier: it needs at least 4 budgets")
  _check(c.mode == "pretrain", "mode", f"{c.mode!r}: sweeps pre-train from scratch")
  _check(not c.init_checkpoint, "init_checkpoint", "sweeps train from scratch")
  config_lib.validate(c)


def check_inputs(c: ml_collections.ConfigDict) -> None:
  """The shards exist and have the eval split that every run's final loss is measured on."""
  trainer.check_inputs(c)
  try:
    n_eval = len(shards.open_split(c.data.shards_dir, c.data.eval_split))
  except (KeyError, ValueError) as error:
    raise ValueError(f"config.data.eval_split: {c.data.shards_dir} has no split "
                     f"{c.data.eval_split!r}: {error}") from error
  _check(n_eval > 0, "data.eval_split", f"{c.data.eval_split!r} of {c.data.shards_dir} is empty")


def run_config(c: ml_collections.ConfigDict, run: Run, steps: int) -> ml_collections.ConfigDict:
  """The trainer's config of one run: the base config at this shape, for `steps` steps."""
  r = ml_collections.ConfigDict(c.to_dict())
  del r["sweep"]
  r.model.size = run.shape.name
  r.train.num_steps = steps
  r.optimizer.warmup_steps = int(c.sweep.warmup_fraction * steps)
  # One eval and one checkpoint, at the end: the sweep keeps only the final numbers.
  r.train.eval_every = r.train.checkpoint_every = steps
  r.train.keep_checkpoints = 1
  r.train.log_every = min(c.train.log_every, steps)
  return r


@dataclasses.dataclass(frozen=True)
class Plan:
  steps: int
  flops: float  # trainer.step_flops summed over the run's batches
  patches: int  # real patches in those batches
  params: int


def plan_run(c: ml_collections.ConfigDict, run: Run) -> Plan:
  """Steps until the FLOPs of the batches this run will see reach its budget.

  The trainer's iterator is deterministic for a seed, so these are the very batches it trains on.
  """
  # The step count is what this finds; the model and optimizer state have the same shapes for any
  # count (2: the least a cosine schedule takes).
  r = run_config(c, run, steps=2)
  # step_flops reads only the model config and whether a reference model runs (not here).
  counter = types.SimpleNamespace(model_cfg=trainer.model_config(r), reference=None)
  params = planning.count_params(planning.abstract_state(r)[2].params)
  data = trainer.make_train_data(r)
  steps, flops, patches = 0, 0.0, 0
  while flops < run.budget:
    batch = next(data)
    step = trainer.step_flops(counter, batch)
    if step <= 0:
      raise ValueError(f"{c.data.shards_dir}: a batch with no piece of 2+ patches")
    steps, flops, patches = steps + 1, flops + step, patches + int(batch["masks"].sum())
  return Plan(steps, flops, patches, params)


@dataclasses.dataclass
class Sweep:
  """A checked sweep: its runs, the rows of those already finished, plans for the rest."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  output_dir: epath.Path
  runs: list[Run]
  finished: dict[str, dict]
  plans: dict[str, Plan]

  @property
  def csv_path(self) -> epath.Path:
    return self.output_dir / CSV_NAME

  @property
  def png_path(self) -> epath.Path:
    return self.output_dir / PNG_NAME


def _settings(config: dict) -> dict:
  """What the finished runs depend on: everything but the workdir, the grid and the analysis."""
  d = {k: v for k, v in config.items() if k != "workdir"}
  d["sweep"] = {k: v for k, v in config["sweep"].items() if k not in _GRID_FIELDS}
  return d


def plan_sweep(c: ml_collections.ConfigDict, workdir: epath.PathLike | None = None) -> Sweep:
  """Checks every value and plans every unfinished run; trains nothing.

  `workdir` (default `config.workdir`) gets a folder per run. Raises ValueError or
  FileNotFoundError naming the wrong value.
  """
  c = ml_collections.ConfigDict(c.to_dict())
  c.workdir = str(workdir or c.workdir)
  validate(c)
  check_inputs(c)
  workdir = storage.path(c.workdir)
  output_dir = storage.path(c.sweep.output_dir or workdir)
  settings_path = output_dir / SETTINGS_NAME
  config = json.loads(c.to_json_best_effort())
  if settings_path.exists():
    changed = _changed(_settings(json.loads(settings_path.read_text())), _settings(config))
    if changed:
      raise ValueError(f"{output_dir} holds a sweep with other settings ({', '.join(changed)}): "
                       "only sweep.models, budgets, fit and output_dir may change; use another "
                       "--workdir / sweep.output_dir")
  runs = expand_grid(c)
  finished = {row["run"]: row for row in read_rows(output_dir / CSV_NAME)}
  plans = {}
  for run in runs:
    if run.name in finished:
      continue
    plans[run.name] = plan_run(c, run)
    if plans[run.name].steps < c.sweep.min_steps:
      raise ValueError(
          f"config.sweep.budgets: {run.budget:.3g} FLOPs gives {run.shape.name} only "
          f"{plans[run.name].steps} steps (< sweep.min_steps {c.sweep.min_steps}); raise the "
          "budget or drop the model")
  output_dir.mkdir(parents=True, exist_ok=True)
  settings_path.write_text(json.dumps(config, indent=2, sort_keys=True))
  return Sweep(c, workdir, output_dir, runs, finished, plans)


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
  """'field: old -> new' for every nested field that differs."""
  keys = sorted(set(old) | set(new))
  out = []
  for k in keys:
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _changed(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out


def train_run(sweep: Sweep, run: Run) -> dict:
  """Trains (or finishes) one run in WORKDIR/<run> and returns its CSV row."""
  plan = sweep.plans[run.name]
  run_dir = sweep.workdir / run.name
  start = time.perf_counter()
  trainer.train_and_evaluate(run_config(sweep.config, run, plan.steps), str(run_dir))
  wall = time.perf_counter() - start
  logged = run_metrics(run_dir, plan.steps)
  if not np.isclose(logged["flops"], plan.flops, rtol=1e-6):
    logging.warning("%s: the trainer counted %.6g FLOPs, the plan %.6g", run.name,
                    logged["flops"], plan.flops)
  return {"run": run.name, "model": run.shape.name, "patch_layers": run.shape.patch_layers,
          "char_layers": run.shape.char_layers, "hidden": run.shape.hidden,
          "params": plan.params, "budget_flops": run.budget, "steps": plan.steps,
          "patches_seen": plan.patches, "wall_s": wall, **logged}


def run_metrics(run_dir: epath.Path, steps: int) -> dict:
  """FLOPs and chars trained on (the trainer's counts), last train loss and final eval, from the
  run's metrics.jsonl; a restarted run's lines replace the earlier ones of the same step."""
  lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  train = {m["step"]: m for m in lines if m["split"] == "train"}
  evals = {m["step"]: m for m in lines if m["split"] == "eval"}
  if steps not in evals:
    raise RuntimeError(f"{run_dir}: no eval at the last step {steps}")
  logged = sorted(train)
  windows = np.diff([0] + logged)  # each train line is the mean over the steps since the last
  return {"flops": float(sum(train[s]["flops"] * w for s, w in zip(logged, windows))),
          "chars_seen": int(round(sum(train[s]["n_chars"] * w for s, w in zip(logged, windows)))),
          "train_loss": train[logged[-1]]["loss"], "eval_loss": evals[steps]["loss"],
          "eval_bits_per_char": evals[steps]["bits_per_char"]}


def read_rows(path: epath.PathLike) -> list[dict]:
  path = storage.path(path)
  if not path.exists():
    return []
  rows = csv.DictReader(io.StringIO(path.read_bytes().decode(), newline=""))
  return [{k: v if k in _STR_FIELDS else int(v) if k in _INT_FIELDS else float(v)
           for k, v in row.items()} for row in rows]


def append_row(path: epath.PathLike, row: dict) -> None:
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, FIELDS)
  if not storage.path(path).exists():
    writer.writeheader()
  writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
  storage.append_text(path, text.getvalue())


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """L(C) = a * C^-b + c."""
  a: float
  b: float
  c: float = 0.0

  def __call__(self, compute: np.ndarray | float) -> np.ndarray:
    return self.a * np.power(np.asarray(compute, float), -self.b) + self.c

  def __str__(self) -> str:
    offset = f" + {self.c:.4g}" if self.c else ""
    return f"L(C) = {self.a:.4g} * C^-{self.b:.4g}{offset}"


def _log_linear_fit(compute: np.ndarray, loss: np.ndarray, c: float = 0.0) -> PowerLaw:
  """log(L - c) = log a - b log C by least squares."""
  slope, intercept = np.polyfit(np.log(compute), np.log(loss - c), 1)
  return PowerLaw(float(np.exp(intercept)), float(-slope), c)


def fit_power_law(compute: Sequence[float], loss: Sequence[float],
                  offset: bool = False) -> PowerLaw:
  """L(C) = a C^-b (+ c with `offset`), least squares in log L, numpy only.

  Without offset the fit is linear in log-log. With it, the best (a, b) for a given c is the
  linear fit of log(L - c); c is the best of a grid over [0, min L), refined by golden-section
  search between the grid's neighbours of that best.
  """
  compute, loss = np.asarray(compute, float), np.asarray(loss, float)
  needed = 3 if offset else 2
  if len(compute) < needed or np.any(loss <= 0) or np.any(compute <= 0):
    raise ValueError(f"fit: needs at least {needed} points of positive compute and loss, got "
                     f"{len(compute)}")
  if not offset:
    return _log_linear_fit(compute, loss)

  def error(c: float) -> float:
    return float(np.sum((np.log(_log_linear_fit(compute, loss, c)(compute)) - np.log(loss))**2))

  top = float(loss.min())
  grid = top * np.linspace(0.0, 1.0, 1001)[:-1]
  best = int(np.argmin([error(c) for c in grid]))
  lo = grid[max(best - 1, 0)]
  hi = grid[best + 1] if best + 1 < len(grid) else top * (1 - 1e-9)
  ratio = (np.sqrt(5) - 1) / 2
  for _ in range(100):
    x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    if error(x1) < error(x2):
      hi = x2
    else:
      lo = x1
  return _log_linear_fit(compute, loss, (lo + hi) / 2)


def frontier(rows: Sequence[dict]) -> list[dict]:
  """The compute-optimal runs: the lowest eval loss at each budget, smallest budget first."""
  best: dict[float, dict] = {}
  for row in rows:
    budget = row["budget_flops"]
    if budget not in best or row["eval_loss"] < best[budget]["eval_loss"]:
      best[budget] = row
  return [best[b] for b in sorted(best)]


def plot(rows: Sequence[dict], front: Sequence[dict], law: PowerLaw,
         path: epath.Path) -> None:
  """Eval loss against compute (log x), a line per model, the frontier and its fit."""
  fig = figure.Figure(figsize=(7.5, 4.8), layout="constrained")
  ax = fig.add_subplot()
  models = sorted({r["model"] for r in rows}, key=lambda m: next(r["params"] for r in rows
                                                                 if r["model"] == m))
  for model in models:
    mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["flops"])
    ax.plot([r["flops"] for r in mine], [r["eval_loss"] for r in mine], "o-",
            label=f"{model} ({mine[0]['params'] / 1e6:.2f}M params)")
  ax.plot([r["flops"] for r in front], [r["eval_loss"] for r in front], "k*", ms=13,
          label="compute-optimal frontier", zorder=3)
  xs = np.geomspace(min(r["flops"] for r in rows), max(r["flops"] for r in rows), 100)
  ax.plot(xs, law(xs), "k--", label=f"fit: {law}")
  ax.set_xscale("log")
  ax.set_xlabel("compute C (model FLOPs: 3 x forward over real patches)")
  ax.set_ylabel("final eval loss (nats per char)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  storage.save_figure(fig, path, dpi=120)


@dataclasses.dataclass(frozen=True)
class Result:
  rows: list[dict]  # the grid's runs, in grid order
  frontier: list[dict]
  law: PowerLaw
  csv_path: epath.Path
  png_path: epath.Path


def run_sweep(sweep: Sweep, report: Callable[[str], None] = logging.info) -> Result:
  """Trains the unfinished runs (each row appended to the CSV as it ends), then fits and plots."""
  todo = [run for run in sweep.runs if run.name not in sweep.finished]
  for i, run in enumerate(todo, 1):
    report(f"run {i}/{len(todo)}: {run.name}, {sweep.plans[run.name].steps} steps")
    row = train_run(sweep, run)
    append_row(sweep.csv_path, row)
    sweep.finished[run.name] = row
    report(f"  eval loss {row['eval_loss']:.4f}, {row['wall_s']:.0f} s")
  rows = [sweep.finished[run.name] for run in sweep.runs]
  front = frontier(rows)
  law = fit_power_law([r["flops"] for r in front], [r["eval_loss"] for r in front],
                      offset=sweep.config.sweep.fit == "offset")
  plot(rows, front, law, sweep.png_path)
  return Result(rows, front, law, sweep.csv_path, sweep.png_path)


def format_plan(sweep: Sweep) -> str:
  lines = [f"{'run':<24} {'params':>10} {'steps':>7} {'FLOPs':>10}"]
  for run in sweep.runs:
    if run.name in sweep.finished:
      lines.append(f"{run.name:<24} {'finished':>10}")
    else:
      p = sweep.plans[run.name]
      lines.append(f"{run.name:<24} {p.params:>10,} {p.steps:>7} {p.flops:>10.3g}")
  return "\n".join(lines)


def format_table(result: Result) -> str:
  """The runs, a '*' on the frontier's."""
  on_front = {r["run"] for r in result.frontier}
  lines = [f"{'run':<24} {'params':>10} {'steps':>7} {'FLOPs':>10} {'patches':>9} "
           f"{'eval loss':>9} {'bits/char':>9} {'wall s':>7}"]
  for r in result.rows:
    lines.append(f"{r['run']:<24} {r['params']:>10,} {r['steps']:>7} {r['flops']:>10.3g} "
                 f"{r['patches_seen']:>9,} {r['eval_loss']:>9.4f} {r['eval_bits_per_char']:>9.4f} "
                 f"{r['wall_s']:>7.0f}" + (" *" if r["run"] in on_front else ""))
  return "\n".join(lines)
