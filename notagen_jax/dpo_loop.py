"""CLaMP-DPO as one resumable loop: sample -> score -> select -> DPO train, K times.

The original runs this as five scripts whose paths are edited by hand between steps. Here each
iteration lives in WORKDIR/iteration_<k>/:

  samples/            the pieces drawn from the current policy (generation.generate), samples.json
  scores.json         per-piece scores and filter verdicts, the selection's counts, overall and
                      per prompt
  preferences.json    {"chosen": [...], "rejected": [...]}: the original's format, raw texts
  train/              the DPO run (trainer.train_and_evaluate), final_params/ = the next policy

A step whose output exists is not redone, so an interrupted loop continues where it stopped
(within sampling too: a drawn piece is not drawn again).
With several processes (`distributed.initialize`, the same flags as `train`) every process draws
and scores its share of the pieces over its local devices, process 0 writes the shared files, and
DPO trains on the whole mesh; the pieces, scores and pairs are those of one process.
After the last training, iteration K samples and scores the final policy (no training), so the
summary shows the score of every policy. WORKDIR/summary.json|.txt and score.png sum it up (mean
score with its standard error, the share passing each filter, validity); with several prompts
WORKDIR/summary_prompts.json|.txt holds the same per prompt. WORKDIR/report.html adds the chosen
and rejected pieces of each iteration, engraved.

Prompts as the paper's: one (`prompt`), or every period-composer-instrumentation combination of
the ground-truth corpus (`prompts_from_corpus`), `sample.num_pieces` pieces each; each prompt's
pieces are scored against the mean embedding of its own ground-truth pieces and selected among
themselves (the best and worst `select.fraction` of each prompt), the pairs of all prompts
trained together.
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
# Shares of the scored pieces that pass each of the original's filters.
FILTER_COLUMNS = {"aligned": "misaligned", "grouped": "instruments_apart",
                  "original": "plagiarized"}
COLUMNS = ("iteration", "pieces", "valid", *SAMPLE_COLUMNS, "scored", "mean_score", "score_se",
           *FILTER_COLUMNS, *COUNT_COLUMNS)
PROMPT_COLUMNS = ("iteration", "prompt", "pieces", "scored", "mean_score", "score_se",
                  *FILTER_COLUMNS, "chosen", "rejected")


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
  check(c.prompts_from_corpus or all(c.prompt), "prompt",
        f"{tuple(c.prompt)} needs period, composer, instrumentation")
  check(not c.prompts_from_corpus or c.ground_truth.match_prompt, "ground_truth.match_prompt",
        "prompts_from_corpus scores each prompt against its own ground truth")
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


def prompts(c: ml_collections.ConfigDict) -> list[generation.Combination]:
  """The loop's prompts: `c.prompt`, or every combination of the ground-truth corpus."""
  if not c.prompts_from_corpus:
    return [tuple(c.prompt)]
  found = sorted(generation.known_combinations(c.ground_truth.prepared_dir))
  if not found:
    raise ValueError(f"{c.ground_truth.prepared_dir}: no prepared piece has a prompt")
  return found


def make_embedder(c: ml_collections.ConfigDict) -> Embedder:
  if c.kind == "clamp2":
    from notagen_jax.scoring import clamp2  # pylint: disable=import-outside-toplevel
    return clamp2.Clamp2Embedder.from_checkpoint(c.checkpoint)
  from notagen_jax.scoring import symbolic  # pylint: disable=import-outside-toplevel
  return symbolic.SymbolicEmbedder(workers=c.workers)


def sample(c: ml_collections.ConfigDict, policy: str, out: epath.Path, seed: int,
           combinations: Sequence[generation.Combination]) -> tuple[list[str], dict[str, Any]]:
  """The iteration's pieces (raw texts) and their record, drawn unless samples.json exists:
  `sample.num_pieces` per prompt, prompt after prompt."""
  done = out / "samples.json"
  if not done.exists():
    model = checkpoint.load_model(policy)
    texts = [generation.prompt_text(*p) for p in combinations for _ in range(c.sample.num_pieces)]
    written = generation.generate(model, texts, out,
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
          ground_truth: Sequence[np.ndarray], out: epath.Path) -> dict[str, Any]:
  """Scores and selects each prompt's pieces against its ground truth (`ground_truth[j]` for the
  j-th prompt's `sample.num_pieces` pieces); writes scores.json and preferences.json unless
  there already."""
  path = out / "scores.json"
  if not path.exists():
    # Each process embeds its share of the pieces; all then select alike, process 0 writes.
    shared = distributed.SharedEmbedder(embedder, out / "features")
    n = c.sample.num_pieces
    selections = [preferences.choose(texts[j * n:(j + 1) * n], shared, truth,
                                     fraction=c.select.fraction,
                                     max_similarity=c.scorer.max_similarity,
                                     score_malformed=c.select.score_malformed,
                                     filters=tuple(c.select.filters))
                  for j, truth in enumerate(ground_truth)]
    selection = preferences.Selection(
        chosen=[j * n + i for j, s in enumerate(selections) for i in s.chosen],
        rejected=[j * n + i for j, s in enumerate(selections) for i in s.rejected],
        scores=np.concatenate([s.scores for s in selections]),
        interleaved=[t for s in selections for t in s.interleaved],
        counts=_total([s.counts for s in selections]),
        verdicts={name: [v for s in selections for v in s.verdicts[name]]
                  for name in preferences.FILTERS})
    if distributed.is_lead():
      preferences.write_preferences(out / "preferences.json", texts, selection)
      path.write_text(json.dumps({
          **_scored(selection.counts, selection.scores),
          "chosen": selection.chosen, "rejected": selection.rejected,
          "verdicts": selection.verdicts,
          "prompts": [_scored(s.counts, s.scores) for s in selections]}, indent=1))
    distributed.barrier(f"notagen_jax:scored:{out}")
  return json.loads(path.read_text())


def _total(counts: Sequence[preferences.Counts]) -> preferences.Counts:
  """The counts of every prompt together; the mean over every scored piece."""
  if len(counts) == 1:
    return counts[0]
  fields = {k: sum(getattr(x, k) for x in counts) for k in vars(counts[0]) if k != "mean_score"}
  weights = [(x.mean_score, x.scored) for x in counts if x.scored]
  mean = (sum(m * w for m, w in weights) / sum(w for _, w in weights)) if weights else float("nan")
  return preferences.Counts(**fields, mean_score=mean)


def _scored(counts: preferences.Counts, scores: np.ndarray) -> dict[str, Any]:
  stats = report.mean_and_error([float(x) for x in scores])
  return {"counts": {k: _plain(v) for k, v in vars(counts).items()},
          "score_se": None if stats is None else stats[1],
          "scores": [None if np.isnan(x) else float(x) for x in scores]}


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
          **_score_columns(scores), **{k: counts[k] for k in COUNT_COLUMNS}}


def _score_columns(scores: dict[str, Any]) -> dict[str, Any]:
  """Scored pieces, mean score and its standard error, shares passing each filter."""
  counts, scored = scores["counts"], scores["counts"]["scored"]
  se = scores.get("score_se")  # absent from a scores.json older than it
  return {"scored": scored,
          "mean_score": None if counts["mean_score"] is None else round(counts["mean_score"], 4),
          "score_se": None if se is None else round(se, 4),
          **{name: round(1 - counts[failed] / scored, 3) if scored else None
             for name, failed in FILTER_COLUMNS.items()}}


def prompt_rows(iteration: int, combinations: Sequence[generation.Combination],
                scores: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per prompt of an iteration (PROMPT_COLUMNS)."""
  return [{"iteration": iteration, "prompt": " / ".join(p), "pieces": s["counts"]["generated"],
           **_score_columns(s), "chosen": s["counts"]["chosen"],
           "rejected": s["counts"]["rejected"]}
          for p, s in zip(combinations, scores.get("prompts", []))]


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
  text = lambda r, n: "-" if r[n] is None else str(r[n])
  widths = [max([len(name), 8] + [len(text(r, name)) for r in rows]) for name in columns]
  lines = ["  ".join(name.rjust(w) for name, w in zip(columns, widths))]
  for r in rows:
    lines.append("  ".join(text(r, n).rjust(w) for n, w in zip(columns, widths)))
  return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: epath.Path, scorer: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  points = [(r["iteration"], r["mean_score"], r["score_se"] or 0.0) for r in rows
            if r["mean_score"] is not None]
  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
  ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
              marker="o", capsize=4)
  ax.set_xlabel("CLaMP-DPO iteration (policy trained k times)")
  ax.set_ylabel(f"mean score ({scorer}) ± s.e.")
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
  combinations = prompts(c)
  truths = [ground_truth_texts(c.ground_truth.prepared_dir,
                               p if c.ground_truth.match_prompt else None) for p in combinations]
  caches = [workdir / f"ground_truth_{embedder.name}.npy"] if len(combinations) == 1 else [
      workdir / "ground_truth" / f"{embedder.name}_{j:03d}.npy" for j in range(len(combinations))]
  # Process 0 embeds the ground truth into the caches, which the others then read.
  if lead:
    for truth, cache in zip(truths, caches):
      preferences.ground_truth_features(truth, embedder, cache=cache)
  distributed.barrier(f"notagen_jax:ground_truth:{workdir}")
  truth_features = [preferences.ground_truth_features(truth, embedder, cache=cache)
                    for truth, cache in zip(truths, caches)]
  logging.info("%d prompts, ground truth: %d pieces", len(combinations), sum(map(len, truths)))
  policy, rows, by_prompt = c.init_checkpoint, [], []
  for k in range(c.iterations + 1):
    out = workdir / f"iteration_{k}"
    out.mkdir(exist_ok=True)
    texts, samples = sample(c, policy, out / "samples", seed=c.sample.seed + 1000 * k,
                            combinations=combinations)
    scores = score(c, texts, embedder, truth_features, out)
    rows.append(row(k, samples, scores))
    by_prompt += prompt_rows(k, combinations, scores)
    if lead:
      _write_summary(workdir, rows, embedder.name)
      shown_prompts = by_prompt if len(combinations) > 1 else []
      if shown_prompts:
        (workdir / "summary_prompts.json").write_text(json.dumps(by_prompt, indent=1))
        (workdir / "summary_prompts.txt").write_text(table(by_prompt, PROMPT_COLUMNS) + "\n")
      report.write_dpo_report(workdir, rows, COLUMNS, embedder.name, tuple(c.select.filters),
                              shown_prompts, PROMPT_COLUMNS)
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
