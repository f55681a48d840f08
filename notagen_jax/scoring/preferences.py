"""CLaMP-DPO's preference data: score generated pieces, filter, choose, write the pairs file.

As the original's RL/data.py does it: a piece's score is the cosine between its embedding (of the
un-reduced text) and the mean embedding of the ground-truth corpus. With n = int(fraction * the
number of pieces scored), the rejected set is the n lowest scores, and the chosen set is the first
n pieces, best score first, that pass three filters: the voices' bars align (same barlines, bar
counts and bar durations), the staves of one instrument are grouped together in the header, and
no ground-truth piece is more similar than `max_similarity` (0.95) (against plagiarism). A piece
that cannot be un-reduced or embedded is left out of both sets, as the original has no embedding
for it. One deliberate difference: the chosen set is never drawn from the rejected set (the
original could pick a piece for both when too few pass the filters, a pair with no preference).
The pairs file holds the raw generated texts, `[r:` markers and rest reduction included, as the
original's DPO step reads the generated files themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import re
from typing import Sequence

from abctoolkit.check import check_alignment_unrotated
from abctoolkit.rotate import unrotate_abc
from absl import logging
from etils import epath
import numpy as np

from notagen_jax.data import abc
from notagen_jax.scoring import Embedder

FRACTION = 0.1
MAX_SIMILARITY = 0.95
# The original's chosen-set filters: voices' bars aligned, staves of one instrument grouped, and
# no piece too close to a ground-truth piece.
FILTERS = ("aligned", "grouped", "original")


@dataclasses.dataclass(frozen=True)
class Counts:
  """How many pieces each step kept or dropped, for the loop's summary table.

  The filter counts are over the scored pieces, each filter on its own (a piece may fail several).
  """
  generated: int
  scored: int
  failed: int  # could not be un-reduced or embedded
  misaligned: int
  instruments_apart: int
  plagiarized: int
  chosen: int
  rejected: int
  mean_score: float  # over the scored pieces (NaN when none)


@dataclasses.dataclass(frozen=True)
class Selection:
  chosen: list[int]  # indices into the generated texts, best score first
  rejected: list[int]  # the lowest scores, in descending order as the original lists them
  scores: np.ndarray  # float32 [N], NaN for a piece that failed
  interleaved: list[str | None]  # the un-reduced texts, None where un-reduction failed
  counts: Counts
  verdicts: dict[str, list[bool]]  # each of FILTERS on each piece, applied or not


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine of each vector of `a` [..., D] with each of `b` [..., D]: shape a[:-1] + b[:-1]."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):  # a zero vector has no direction: NaN
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return np.tensordot(a, b, axes=([-1], [-1]))


def finite_rows(features: np.ndarray) -> np.ndarray:
  return features[np.isfinite(features).all(axis=1)]


def mean_feature(ground_truth: np.ndarray) -> np.ndarray:
  """The mean ground-truth embedding, over the pieces that were embedded."""
  rows = finite_rows(ground_truth)
  if not len(rows):
    raise ValueError("no ground-truth piece has an embedding")
  return rows.mean(axis=0)


def bars_aligned(interleaved: str) -> bool:
  """The original's first filter: all voices have the same barlines, bar count and bar durations.

  Reads the un-reduced text, de-interleaves it and runs abctoolkit's alignment check; a text the
  check cannot read fails, as in the original.
  """
  lines = interleaved.splitlines(keepends=True)
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # the check prints every odd bar
      return all(check_alignment_unrotated(unrotate_abc(lines)))
  except Exception:  # pylint: disable=broad-except  # abctoolkit raises anything on odd text
    return False


def instruments_grouped(text: str) -> bool:
  """The original's second filter: the staves of one instrument (`nm="..."`) are consecutive."""
  seen, last = set(), ""
  for line in text.splitlines():
    match = re.search(r'nm="([^"]+)"', line) if line.startswith("V:") else None
    if match:
      name = match.group(1)
      if name != last and name in seen:
        return False
      seen.add(name)
      last = name
  return True


def select(scores: np.ndarray, passes: np.ndarray,
           fraction: float = FRACTION) -> tuple[list[int], list[int]]:
  """Chosen and rejected indices; NaN scores take no part. Ties keep the generation order."""
  order = sorted(np.flatnonzero(np.isfinite(scores)), key=lambda i: -scores[i])
  n = int(len(order) * fraction)
  rejected = order[len(order) - n:] if n else []
  chosen = [i for i in order[:len(order) - n] if passes[i]][:n]
  return [int(i) for i in chosen], [int(i) for i in rejected]


def _dim(ground_truth: np.ndarray) -> int:
  if ground_truth.ndim != 2:
    raise ValueError(f"ground-truth features must be [pieces, dim], got {ground_truth.shape}")
  return ground_truth.shape[1]


def _without_markers(text: str) -> str:
  return re.sub(r"^\[r:[^\]]*\]", "", text, flags=re.MULTILINE)


def choose(texts: Sequence[str], embedder: Embedder, ground_truth: np.ndarray, *,
           fraction: float = FRACTION, max_similarity: float = MAX_SIMILARITY,
           score_malformed: bool = False, filters: Sequence[str] = FILTERS) -> Selection:
  """Un-reduces and embeds the generated `texts`, scores, filters and selects them.

  With `score_malformed`, a piece that cannot be un-reduced is embedded as generated (markers
  removed) instead of being left out: it can then be rejected, never chosen. The original never
  meets such pieces (its sampler retries until un-reduction succeeds); a weak model makes many,
  and they are the clearest negatives it has. `filters` names the chosen-set filters applied
  (a subset of FILTERS); a chosen piece must always un-reduce. Each filter is counted either way.
  """
  unknown = set(filters) - set(FILTERS)
  if unknown:
    raise ValueError(f"unknown filters {sorted(unknown)}; known: {FILTERS}")
  ground_truth = np.asarray(ground_truth, np.float32)
  interleaved: dict[int, str] = {}
  to_embed: dict[int, str] = {}
  for i, text in enumerate(texts):
    try:
      interleaved[i] = to_embed[i] = abc.unreduce(text)
    except abc.PieceError as error:
      logging.info("piece %d not un-reduced: %s", i, error)
      if score_malformed:
        to_embed[i] = _without_markers(text)
  features = np.full((len(texts), _dim(ground_truth)), np.nan, np.float32)
  if to_embed:
    features[list(to_embed)] = embedder.embed(list(to_embed.values()))
  scores = cosine(features, mean_feature(ground_truth)).astype(np.float32)
  scored = np.isfinite(scores)
  nearest = np.full(len(texts), np.nan)
  if scored.any():
    nearest[scored] = cosine(features[scored], finite_rows(ground_truth)).max(axis=1)
  aligned = np.array([scored[i] and i in interleaved and bars_aligned(interleaved[i])
                      for i in range(len(texts))], bool)
  grouped = np.array([instruments_grouped(text) for text in texts], bool)
  original = nearest <= max_similarity
  verdicts = {"aligned": aligned, "grouped": grouped, "original": original}
  passes = np.array([i in interleaved for i in range(len(texts))], bool)
  for name in filters:
    passes &= verdicts[name]
  chosen, rejected = select(scores, passes, fraction)
  counts = Counts(
      generated=len(texts), scored=int(scored.sum()), failed=int((~scored).sum()),
      misaligned=int((scored & ~aligned).sum()), instruments_apart=int((scored & ~grouped).sum()),
      plagiarized=int((scored & ~original).sum()), chosen=len(chosen), rejected=len(rejected),
      mean_score=float(scores[scored].mean()) if scored.any() else float("nan"))
  return Selection(chosen, rejected, scores, [interleaved.get(i) for i in range(len(texts))],
                   counts, {name: ok.tolist() for name, ok in verdicts.items()})


def write_preferences(path: epath.PathLike, texts: Sequence[str], selection: Selection) -> None:
  """The original's pairs file, `{"chosen": [...], "rejected": [...]}`, holding the raw texts."""
  data = {"chosen": [texts[i] for i in selection.chosen],
          "rejected": [texts[i] for i in selection.rejected]}
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=4))


def read_texts(folder: epath.PathLike, pattern: str = "*.abc") -> list[str]:
  """The texts of a folder's ABC files in name order (e.g. a prepared corpus's interleaved/)."""
  paths = sorted(epath.Path(folder).glob(pattern))
  if not paths:
    raise FileNotFoundError(f"no {pattern} files in {folder}")
  return [path.read_text() for path in paths]


def ground_truth_features(texts: Sequence[str], embedder: Embedder,
                          cache: epath.PathLike | None = None) -> np.ndarray:
  """Embeddings [N, dim] of the ground-truth pieces (NaN rows where one failed).

  With `cache` (a .npy path) they are saved there, with the embedder's name and a hash of the
  texts in a .json beside it, and loaded instead of recomputed while both match.
  """
  digest = hashlib.sha256("\0".join([embedder.name, *texts]).encode()).hexdigest()
  cache = epath.Path(cache) if cache is not None else None
  stamp = cache.with_suffix(".json") if cache is not None else None
  if cache is not None and cache.exists() and stamp.exists():
    if json.loads(stamp.read_text())["sha256"] == digest:
      with cache.open("rb") as f:
        return np.load(f)
  features = np.asarray(embedder.embed(list(texts)), np.float32)
  failed = int((~np.isfinite(features).all(axis=1)).sum())
  if failed:
    logging.warning("%d of %d ground-truth pieces could not be embedded", failed, len(texts))
  if cache is not None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("wb") as f:
      np.save(f, features)
    stamp.write_text(json.dumps({"embedder": embedder.name, "pieces": len(texts),
                                 "sha256": digest}))
  return features
