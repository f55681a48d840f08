"""Corpus preparation: every piece through the ABC pipeline, in parallel, resumable, never fatal.

Output layout under `out_dir`:
  pieces/<aa>/<piece_id>.json   one prepared piece (the format `shards.py` reads)
  failed/<aa>/<piece_id>.json   one failure: file, tune, reason
  interleaved/<piece_id>.abc    the cleaned interleaved ABC (what the scorer reads)
  index.jsonl                   every prepared piece: id, split, file (so readers need not open each)
  report.json                   counts and every failure, rewritten at the end of each run
`<aa>` is the first two hex digits of the id's hash, to keep folders small. A rerun skips every
piece that already has a result (pass `retry_failed` to try the failures again).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from typing import Any, Iterable

import tqdm
from etils import epath

from notagen_jax import storage
from notagen_jax.data import abc
from notagen_jax.data import corpus


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  eval_fraction: float = 0.1
  workers: int = 0  # 0: all cores
  retry_failed: bool = False
  limit: int = 0  # 0: every piece; otherwise the first `limit` (for quick runs)
  # Apache Beam PipelineOptions: the pieces prepared on Beam's workers (data/beam.py), not here.
  beam_options: Any = None


def _bucket(piece_id: str) -> str:
  return hashlib.sha1(piece_id.encode()).hexdigest()[:2]


def piece_path(out_dir: epath.Path, piece_id: str) -> epath.Path:
  return out_dir / "pieces" / _bucket(piece_id) / f"{piece_id}.json"


def failure_path(out_dir: epath.Path, piece_id: str) -> epath.Path:
  return out_dir / "failed" / _bucket(piece_id) / f"{piece_id}.json"


def prepare_piece(source: corpus.PieceSource, eval_fraction: float) -> dict:
  """One piece through conversion, cleaning, interleaving, the 15 keys and rest reduction."""
  standard = source.to_standard_abc()
  lines = abc.clean(standard)
  metadata = dict(source.metadata)
  metadata.setdefault("instrumentation", corpus.instrumentation(standard))
  return {
      "piece_id": source.piece_id,
      "source": source.path + (f"#{source.tune}" if source.tune else ""),
      "split": corpus.split_of(source.piece_id, eval_fraction),
      "original_key": abc.original_key(lines),
      **{field: metadata.get(field, "") for field in corpus.PROMPT_FIELDS},
      "prompt": corpus.prompt_lines(metadata),
      "interleaved": abc.interleave(lines),
      "augmented": abc.augment(lines),
  }


def _write_json(path: epath.Path, record: dict) -> None:
  text = json.dumps(record, ensure_ascii=True)
  if storage.is_remote(path):
    path.write_text(text)  # an object appears only once whole
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)  # a killed run never leaves a half-written result behind


def _run_one(args: tuple[corpus.PieceSource, str, float]) -> tuple[str, str]:
  source, out_dir, eval_fraction = args
  out = storage.path(out_dir)
  try:
    record = prepare_piece(source, eval_fraction)
  except abc.PieceError as error:
    reason = str(error)
  except Exception as error:  # a bad file must never stop the run: record it with its reason
    reason = f"{type(error).__name__}: {error}"
  else:
    interleaved = out / "interleaved" / f"{source.piece_id}.abc"
    if not storage.is_remote(interleaved):
      interleaved.parent.mkdir(parents=True, exist_ok=True)
    interleaved.write_text(record["interleaved"])
    _write_json(piece_path(out, source.piece_id), record)
    return "ok", ""
  _write_json(failure_path(out, source.piece_id),
              {"piece_id": source.piece_id, "file": source.path, "tune": source.tune,
               "reason": reason})
  return "failed", reason


def _reason_kind(reason: str) -> str:
  return reason.split(":")[0][:60]


def prepare_corpus(sources: Iterable[corpus.PieceSource], out_dir: str | os.PathLike,
                   options: PrepareOptions = PrepareOptions()) -> dict:
  """Prepares every source not yet done; returns (and writes) the report."""
  out = storage.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  sources, duplicates = corpus.dedupe(sources)
  if options.limit:
    sources = sources[:options.limit]
  existing = _results(out)
  todo = []
  for source in sources:
    if os.fspath(piece_path(out, source.piece_id)) in existing:
      continue
    failed = failure_path(out, source.piece_id)
    if os.fspath(failed) in existing:
      if not options.retry_failed:
        continue
      failed.unlink()
    todo.append(source)
  start = time.time()
  jobs = [(source, str(out), options.eval_fraction) for source in todo]
  if options.beam_options is not None:
    # Imported only here: Beam is an optional extra.
    from notagen_jax.data import beam  # pylint: disable=import-outside-toplevel
    beam.run_each(_run_one, jobs, out, options.beam_options)
  else:
    _run_locally(jobs, options.workers or os.cpu_count() or 1)
  report = build_report(out, sources, options.eval_fraction, time.time() - start, len(jobs))
  report["duplicates"] = duplicates
  (out / "report.json").write_text(json.dumps(report, indent=1))
  return report


def _run_locally(jobs: list[tuple[corpus.PieceSource, str, float]], workers: int) -> None:
  if workers == 1:
    results = map(_run_one, jobs)
    pool = None
  else:
    # Spawned workers: music21 and abctoolkit keep module state that fork would share oddly.
    pool = multiprocessing.get_context("spawn").Pool(workers)
    results = pool.imap_unordered(_run_one, jobs, chunksize=4)
  try:
    for _ in tqdm.tqdm(results, total=len(jobs), desc="prepare", unit="piece", smoothing=0.05):
      pass
  finally:
    if pool is not None:
      pool.close()
      pool.join()


def _results(out: epath.Path) -> set[str]:
  """The piece and failure files already in `out`, listed once (not a lookup per piece: each is
  a request in an object store)."""
  return {os.fspath(path) for folder in ("pieces", "failed")
          for path in storage.files_under(out / folder)}


def build_report(out: epath.Path, sources: list[corpus.PieceSource], eval_fraction: float,
                 seconds: float, processed: int) -> dict:
  """Counts over every requested piece (this run's and earlier runs' results)."""
  failures, splits, index = [], collections.Counter(), []
  existing = _results(out)
  for source in sources:
    path = piece_path(out, source.piece_id)
    failed = failure_path(out, source.piece_id)
    if os.fspath(path) in existing:
      split = corpus.split_of(source.piece_id, eval_fraction)
      splits[split] += 1
      index.append({"piece_id": source.piece_id, "split": split,
                    "file": path.relative_to(out).as_posix()})
    elif os.fspath(failed) in existing:
      failures.append(json.loads(failed.read_text()))
  (out / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in index))
  kinds = collections.Counter(_reason_kind(f["reason"]) for f in failures)
  return {
      "requested": len(sources),
      "processed_this_run": processed,
      "seconds_this_run": round(seconds, 1),
      "prepared": sum(splits.values()),
      "train": splits["train"],
      "eval": splits["eval"],
      "failed": len(failures),
      "failure_kinds": dict(kinds.most_common()),
      "failures": failures,
  }


def summary(report: dict) -> str:
  kinds = ", ".join(f"{n} {kind}" for kind, n in report["failure_kinds"].items())
  return (f"prepared {report['prepared']} of {report['requested']} pieces "
          f"(train {report['train']}, eval {report['eval']}); failed {report['failed']}"
          + (f" ({kinds})" if kinds else "")
          + (f"; {len(report['duplicates'])} files left out as the same piece in another format"
             if report.get("duplicates") else "")
          + f"; this run processed {report['processed_this_run']} in "
          f"{report['seconds_this_run']} s")
