"""CLaMP-DPO as one resumable loop: sample -> score -> select -> DPO train, K times.

The original runs this as five scripts whose paths are edited by hand between steps. Here each
iteration lives in WORKDIR/iteration_<k>/:

  samples/            the pieces drawn from the current policy (generation.generate), samples.json
  scores.json         per-piece scores and the selection's counts
  preferences.json    {"chosen": [...], "rejected": [...]}: the original's format, raw texts
  train/              the DPO run (trainer.train_and_evaluate), final_params/ = the next policy

A step whose output exists is not redone, so an interrupted loop continues where it stopped
(within sampling too: a drawn piece is not drawn again).
With several processes (`distributed.initialize`, the same flags as `train`) every process draws
and scores its share of the pieces over its local devices, process 0 writes the shared files, and
DPO trains on the whole mesh; the pieces, scores and pairs are those of one process.
After the last training, iteration K samples and scores the final policy (no training), so the
summary shows the score of every policy. WORKDIR/summary.json|.txt and score.png sum it up;
WORKDIR/report.html adds the chosen and rejected pieces of each iteration, engraved.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Sequence

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from notagen_jax import checkpoint
from notagen_jax import config as config_lib
from notagen_jax import distributed
from notagen_jax import generation
from notagen_jax import report
from notagen_jax import sampling
from notagen_jax import storage
from notagen_jax import trainer
from notagen_jax.data import corpus
from notagen_jax.scoring import Embedder
from notagen_jax.scoring import preferences

SCORERS = ("symbolic", "clamp2")
# From the samples' summary (`generation.summary`): shares un-reduced / converted to MusicXML (the
# loop writes no MIDI), bar-alignment error and perplexity under the policy that drew them.
SAMPLE_COLUMNS = {"unreduced": "unreduced_share", "musicxml": "musicxml_share",
                  "bae": "bar_alignment_error", "perplexity": "perplexity"}
# From the selection's counts (`preferences.Counts`).
COUNT_COLUMNS = ("chosen", "rejected", "misaligned", "instruments_apart", "plagiarized")
COLUMNS = ("iteration", "pieces", "valid", *SAMPLE_COLUMNS, "scored", "mean_score",
           *COUNT_COLUMNS)


def validate(c: ml_collections.ConfigDict) -> None:
  """Stops a wrong loop config before any work, naming the field."""
  def check(ok: bool, field: str, message: str):
    if not ok:
      raise ValueError(f"config field {field}: {message}")

  check(bool(c.workdir), "workdir", "is empty (or pass --workdir)")
  check(bool(c.init_checkpoint), "init_checkpoint", "the first policy is needed")
  check(c.iterations >= 1, "iterations", f"{c.iterations} must be >= 1")
  check(bool(c.ground_truth.prepared_dir), "ground_truth.prepared_dir", "is empty")
  check(c.scorer.kind in SCORERS, "scorer.kind", f"{c.scorer.kind!r} is not one of {SCORERS}")
  check(c.scorer.kind != "clamp2" or bool(c.scorer.checkpoint), "scorer.checkpoint",
        "CLaMP 2 needs its weights")
  check(0.0 < c.select.fraction <= 0.5, "select.fraction", f"{c.select.fraction} not in (0, 0.5]")
  check(set(c.select.filters) <= set(preferences.FILTERS), "select.filters",
        f"{tuple(c.select.filters)} must be among {preferences.FILTERS}")
  check(c.sample.num_pieces >= 2, "sample.num_pieces", "at least 2 pieces")
  check(all(c.prompt), "prompt", f"{tuple(c.prompt)} needs period, composer, instrumentation")
  sampling.Settings(**_settings_fields(c))  # its own checks
  first = storage.path(c.workdir) / "iteration_0"
  _train_config(c, c.init_checkpoint, first / "preferences.json", first / "train")


def _train_config(c: ml_collections.ConfigDict, policy: str, pairs: epath.Path,
                  out: epath.Path) -> ml_collections.ConfigDict:
  """The DPO run of one iteration: `c.train` from `policy` on `pairs`, validated."""
  cfg = copy.deepcopy(c.train)
  cfg.unlock()
  cfg.init_checkpoint = policy
  cfg.data.preference_file = str(pairs)
  cfg.workdir = str(out)
  config_lib.validate(cfg)
  return cfg


def _settings_fields(c: ml_collections.ConfigDict) -> dict[str, Any]:
  s = c.sample
  return dict(top_k=s.top_k, top_p=s.top_p, temperature=s.temperature, max_chars=s.max_chars,
              max_seconds=s.max_seconds, max_patches=s.max_patches, constrained=s.constrained)


def ground_truth_texts(prepared_dir: epath.PathLike,
                       combination: Sequence[str] | None) -> list[str]:
  """Interleaved texts of the prepared pieces with this (period, composer, instrumentation)."""
  pieces = storage.path(prepared_dir) / "pieces"
  texts = []
  for path in sorted(pieces.glob("*/*.json")):
    record = json.loads(path.read_text())
    if combination and tuple(record[f] for f in corpus.PROMPT_FIELDS) != tuple(combination):
      continue
    texts.append(record["interleaved"])
  if not texts:
    raise ValueError(f"{prepared_dir}: no prepared piece with prompt {tuple(combination or ())}")
  return texts


def make_embedder(c: ml_collections.ConfigDict) -> Embedder:
  if c.kind == "clamp2":
    from notagen_jax.scoring import clamp2  # pylint: disable=import-outside-toplevel
    return clamp2.Clamp2Embedder.from_checkpoint(c.checkpoint)
  from notagen_jax.scoring import symbolic  # pylint: disable=import-outside-toplevel
  return symbolic.SymbolicEmbedder(workers=c.workers)


def sample(c: ml_collections.ConfigDict, policy: str, out: epath.Path,
           seed: int) -> tuple[list[str], dict[str, Any]]:
  """The iteration's pieces (raw texts) and their record, drawn unless samples.json exists."""
  done = out / "samples.json"
  if not done.exists():
    model = checkpoint.load_model(policy)
    prompt = generation.prompt_text(*c.prompt)
    written = generation.generate(model, [prompt] * c.sample.num_pieces, out,
                                  settings=sampling.Settings(**_settings_fields(c)),
                                  batch=c.sample.batch, seed=seed, formats=("xml",),
                                  perplexity=True,  # one forward per piece, next to sampling it
                                  resume=True, progress=distributed.is_lead())
    record = {"summary": generation.summary(written),
              "pieces": [{"abc": w.files["abc"], "ok": w.ok, "musicxml": "xml" in w.files}
                         for w in written]}
    if distributed.is_lead():
      done.write_text(json.dumps(record, indent=1))
    distributed.barrier(f"notagen_jax:sampled:{out}")
  record = json.loads(done.read_text())
  return [storage.path(p["abc"]).read_text() for p in record["pieces"]], record


def score(c: ml_collections.ConfigDict, texts: list[str], embedder: Embedder,
          ground_truth: np.ndarray, out: epath.Path) -> dict[str, Any]:
  """Scores and selects; writes scores.json and preferences.json unless there already."""
  path = out / "scores.json"
  if not path.exists():
    # Each process embeds its share of the pieces; all then select alike, process 0 writes.
    shared = distributed.SharedEmbedder(embedder, out / "features")
    selection = preferences.choose(texts, shared, ground_truth, fraction=c.select.fraction,
                                   max_similarity=c.scorer.max_similarity,
                                   score_malformed=c.select.score_malformed,
                                   filters=tuple(c.select.filters))
    if distributed.is_lead():
      preferences.write_preferences(out / "preferences.json", texts, selection)
      path.write_text(json.dumps({
          "counts": {k: _plain(v) for k, v in vars(selection.counts).items()},
          "scores": [None if np.isnan(s) else float(s) for s in selection.scores],
          "chosen": selection.chosen, "rejected": selection.rejected}, indent=1))
    distributed.barrier(f"notagen_jax:scored:{out}")
  return json.loads(path.read_text())


def _plain(value: Any) -> Any:
  value = value.item() if isinstance(value, np.generic) else value
  return None if isinstance(value, float) and np.isnan(value) else value


def train(c: ml_collections.ConfigDict, policy: str, pairs: epath.Path,
          out: epath.Path) -> str:
  """DPO from `policy` on the pairs; returns the new policy (final params) path."""
  final = out / trainer.FINAL_PARAMS
  if trainer.final_params_step(final) != c.train.train.num_steps:
    trainer.train_and_evaluate(_train_config(c, policy, pairs, out), str(out))
  return str(final)


def row(iteration: int, samples: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
  counts, summary = scores["counts"], samples["summary"]
  valid = sum(p["ok"] and p["musicxml"] for p in samples["pieces"]) / max(summary["pieces"], 1)
  return {"iteration": iteration, "pieces": summary["pieces"], "valid": round(valid, 3),
          # samples.json of a run older than these measures lacks them: shown as "-"
          **{column: summary.get(key) for column, key in SAMPLE_COLUMNS.items()},
          "scored": counts["scored"],
          "mean_score": None if counts["mean_score"] is None else round(counts["mean_score"], 4),
          **{k: counts[k] for k in COUNT_COLUMNS}}


def table(rows: Sequence[dict[str, Any]]) -> str:
  widths = [max(len(name), 8) for name in COLUMNS]
  lines = ["  ".join(name.rjust(w) for name, w in zip(COLUMNS, widths))]
  for r in rows:
    lines.append("  ".join(("-" if r[n] is None else str(r[n])).rjust(w)
                           for n, w in zip(COLUMNS, widths)))
  return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: epath.Path, scorer: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  points = [(r["iteration"], r["mean_score"]) for r in rows if r["mean_score"] is not None]
  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
  ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
  ax.set_xlabel("CLaMP-DPO iteration (policy trained k times)")
  ax.set_ylabel(f"mean score ({scorer})")
  ax.set_xticks([r["iteration"] for r in rows])
  ax.grid(alpha=0.3)
  fig.tight_layout()
  storage.save_figure(fig, path)
  plt.close(fig)


def run(c: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The whole loop; returns the summary rows (also written to WORKDIR/summary.*)."""
  validate(c)
  workdir = storage.path(c.workdir)
  lead = distributed.is_lead()
  if lead:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(c.to_json_best_effort(indent=1))
  embedder = make_embedder(c.scorer)
  combination = tuple(c.prompt) if c.ground_truth.match_prompt else None
  truth = ground_truth_texts(c.ground_truth.prepared_dir, combination)
  cache = workdir / f"ground_truth_{embedder.name}.npy"
  # Process 0 embeds the ground truth into the cache, which the others then read.
  if lead:
    preferences.ground_truth_features(truth, embedder, cache=cache)
  distributed.barrier(f"notagen_jax:ground_truth:{workdir}")
  truth_features = preferences.ground_truth_features(truth, embedder, cache=cache)
  logging.info("ground truth: %d pieces", len(truth))
  policy, rows = c.init_checkpoint, []
  for k in range(c.iterations + 1):
    out = workdir / f"iteration_{k}"
    out.mkdir(exist_ok=True)
    texts, samples = sample(c, policy, out / "samples", seed=c.sample.seed + 1000 * k)
    scores = score(c, texts, embedder, truth_features, out)
    rows.append(row(k, samples, scores))
    if lead:
      _write_summary(workdir, rows, embedder.name)
      report.write_dpo_report(workdir, rows, COLUMNS, embedder.name, tuple(c.select.filters))
      print(table(rows), flush=True)
    if k < c.iterations:
      if not scores["chosen"] or not scores["rejected"]:
        raise RuntimeError(f"iteration {k}: no preference pairs (counts {scores['counts']}); "
                           "sample more pieces or relax the filters")
      policy = train(c, policy, out / "preferences.json", out / "train")
  return rows


def _write_summary(workdir: epath.Path, rows: list[dict[str, Any]], scorer: str) -> None:
  (workdir / "summary.json").write_text(json.dumps(rows, indent=1))
  (workdir / "summary.txt").write_text(table(rows) + "\n")
  plot(rows, workdir / "score.png", scorer)
