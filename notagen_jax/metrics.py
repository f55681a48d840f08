"""How good generated pieces are, as the NotaGen paper measures them.

Every measure reads the raw generated text (`[r:i/j]` stream markers, rest-reduced interleaved
ABC), one piece at a time (`piece_metrics`, `log_likelihood`), and `summarize` sums the pieces up:

- bar-alignment error (BAE): the share of bars whose voices' durations differ. A bar is one body
  line of the un-reduced piece (every voice's bar at that index); durations are read as abctoolkit
  reads them (`abc.bar_duration`: grace notes count zero). A bar with a voice whose duration
  cannot be read counts as an error too (`unmeasured`), not as aligned. A piece that cannot be
  un-reduced has no bars: it is counted apart (the un-reduce rate of `generation.summary`).
- the original's CLaMP-DPO filters that need no ground-truth corpus, as `scoring.preferences`
  applies them: `aligned` (abctoolkit's check on the un-reduced piece; a piece that cannot be
  un-reduced fails) and `grouped` (staves of one instrument together in the header);
- perplexity under a model: exp of the mean negative log-likelihood per character, over all
  characters of all pieces, the text encoded as the DPO step encodes generated text.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from notagen_jax import model as model_lib
from notagen_jax.data import abc
from notagen_jax.data import pipeline
from notagen_jax.data import tokenizer
from notagen_jax.scoring import preferences

# Pieces are padded to a multiple of this many patches so that few lengths get compiled.
BUCKET = 64

_forward = nnx.jit(model_lib.forward, static_argnames=("deterministic", "packed_len"))


def score_ids(model: model_lib.NotaGen, ids: Sequence[Sequence[int]]) -> dict[str, float | int]:
  """n_patches, n_chars, mean_nll and sum_logprob of one encoded piece."""
  n = len(ids)
  length = min(-(-n // BUCKET) * BUCKET, model.cfg.patch_length)
  patches = np.zeros((1, length, model.cfg.patch_size), np.int32)
  patches[0, :n] = ids
  mask = (np.arange(length) < n)[None].astype(np.int32)
  out = _forward(model, jnp.asarray(patches), jnp.asarray(mask))
  n_chars = int(out.n_chars[0])
  sum_logprob = float(out.sum_logprob[0])
  return {"n_patches": n, "n_chars": n_chars, "mean_nll": -sum_logprob / max(n_chars, 1),
          "sum_logprob": sum_logprob}


@dataclasses.dataclass(frozen=True)
class PieceMetrics:
  """One generated piece's counts; `sum_logprob` stays None until a model has scored it."""
  bars: int = 0  # 0 when it cannot be un-reduced
  misaligned_bars: int = 0  # bars whose voices' durations differ
  unmeasured_bars: int = 0  # bars with a voice whose duration abctoolkit cannot read
  aligned: bool = False
  grouped: bool = False
  sum_logprob: float | None = None
  scored_chars: int = 0


def bar_durations(unreduced: str) -> list[dict[str, fractions.Fraction | None]]:
  """Each body line's voice durations (None: unreadable) in unit lengths, barlines left out."""
  lines = tokenizer.text_lines(unreduced)
  body = lines[tokenizer.body_index(lines):]
  durations = []
  for number, line in enumerate(body):
    bars = abc.voice_bars(line.rstrip("\n"), number)
    durations.append({voice: abc.bar_duration(abc.split_barlines(bar, number == 0)[1])
                      for voice, bar in bars.items()})
  return durations


def piece_metrics(text: str) -> PieceMetrics:
  """Bar alignment and the corpus-free filters of one raw generated text."""
  grouped = preferences.instruments_grouped(text)
  try:
    unreduced = abc.unreduce(text)
    durations = bar_durations(unreduced)
  except abc.PieceError:
    return PieceMetrics(grouped=grouped)
  unmeasured = sum(None in bar.values() for bar in durations)
  misaligned = sum(None not in bar.values() and len(set(bar.values())) > 1 for bar in durations)
  return PieceMetrics(bars=len(durations), misaligned_bars=misaligned,
                      unmeasured_bars=unmeasured, aligned=preferences.bars_aligned(unreduced),
                      grouped=grouped)


def log_likelihood(model: model_lib.NotaGen, text: str) -> dict[str, float | int]:
  """`sum_logprob` and `scored_chars` of a raw generated text, encoded as DPO encodes it.

  The encoding keeps the text's own markers and cuts it to the model's patch_length at the head,
  so a piece longer than that is scored on its first patch_length patches.
  """
  patchilizer = tokenizer.Patchilizer(patch_size=model.cfg.patch_size,
                                      patch_length=model.cfg.patch_length)
  scored = score_ids(model, pipeline.preference_ids(patchilizer, text))
  return {"sum_logprob": scored["sum_logprob"], "scored_chars": scored["n_chars"]}


def perplexity(pieces: Sequence[PieceMetrics]) -> float | None:
  """exp(-sum of log-probs / sum of characters) over the scored pieces (None: none scored)."""
  scored = [p for p in pieces if p.sum_logprob is not None]
  chars = sum(p.scored_chars for p in scored)
  if not chars:
    return None
  return math.exp(-sum(p.sum_logprob for p in scored) / chars)


def summarize(pieces: Sequence[PieceMetrics]) -> dict[str, float | int | None]:
  """The run's measures; shares are over all pieces, None where nothing could be counted."""
  n = max(len(pieces), 1)
  bars = sum(p.bars for p in pieces)
  misaligned = sum(p.misaligned_bars for p in pieces)
  unmeasured = sum(p.unmeasured_bars for p in pieces)
  ppl = perplexity(pieces)
  return {
      "bars": bars,
      "misaligned_bars": misaligned,
      "unmeasured_bars": unmeasured,
      "bar_alignment_error": round((misaligned + unmeasured) / bars, 6) if bars else None,
      "aligned_share": round(sum(p.aligned for p in pieces) / n, 3),
      "grouped_share": round(sum(p.grouped for p in pieces) / n, 3),
      "perplexity": None if ppl is None else round(ppl, 4),
      "scored_chars": sum(p.scored_chars for p in pieces),
  }
