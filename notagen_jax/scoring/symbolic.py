"""A weight-free scorer: statistics of the notes themselves, read with abc2xml and music21.

The text (interleaved ABC with inline `[V:n]` voices, as the un-reduction writes it) goes through
abctoolkit's abc2xml, which understands inline voices (music21's own ABC reader puts every voice
into one part), and music21 reads the MusicXML tree. Ten blocks of features follow, each a
histogram: pitch classes relative to the key signature, melodic intervals, note lengths, onset
positions, note density, pitch range and register per voice, how many pitches sound at once,
intervals above the lowest sounding pitch, and bar length. Numbers that vary smoothly (density,
range, register, sounding pitches, bar length) are spread over neighbouring bins, so that close
values give close histograms. Each block is scaled to unit norm and the blocks are weighted
equally, so the cosine of two pieces is the mean of their per-block cosines: no block dominates.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import re
from typing import Callable, Sequence
import warnings

from music21 import chord, key, note, stream
from music21.musicxml import xmlToM21
import numpy as np

with warnings.catch_warnings():  # abc2xml builds its grammar on import with pyparsing's old names
  warnings.simplefilter("ignore", DeprecationWarning)
  from abctoolkit import abc2xml  # pylint: disable=g-import-not-at-top

MAX_INTERVAL = 12  # melodic intervals beyond an octave share one bin per direction
DURATION_STEPS = np.arange(-8, 7)  # log2(quarter length) in half steps: 1/16 .. 8 quarters
ONSET_FRACTIONS = (0.0, 0.25, 1 / 3, 0.5, 2 / 3, 0.75)  # within a quarter-note beat
# Soft histograms: bin centres and the spread of one value over them.
DENSITY_BINS = (np.arange(-3.0, 3.5, 0.5), 0.5)  # log2(onsets per quarter note) of a voice
RANGE_BINS = (np.arange(0.0, 52.0, 4.0), 4.0)  # semitones from a voice's lowest to highest pitch
REGISTER_BINS = (np.arange(24.0, 102.0, 6.0), 6.0)  # a voice's mean MIDI pitch
SOUNDING_BINS = (np.arange(0.0, 9.0), 1.0)  # pitches sounding at once
BAR_BINS = (np.arange(1.0, 8.5, 0.5), 0.75)  # a bar's length in quarter notes, from its meter
BLOCK_SIZES = {
    "pitch_class": 12,
    "interval": 2 * MAX_INTERVAL + 3,
    "duration": len(DURATION_STEPS),
    "onset": len(ONSET_FRACTIONS) + 2,
    "density": len(DENSITY_BINS[0]),
    "range": len(RANGE_BINS[0]),
    "register": len(REGISTER_BINS[0]),
    "sounding": len(SOUNDING_BINS[0]),
    "harmony": 12,
    "bar_length": len(BAR_BINS[0]),
}
DIM = sum(BLOCK_SIZES.values())

# One note or chord of a voice: onset in quarter notes from the start, length, onset within its
# bar, MIDI pitches (ascending), and whether it starts a note (False for a tied continuation).
Event = tuple[float, float, float, tuple[int, ...], bool]


class SymbolicEmbedder:
  """`Embedder` over note statistics, with no weights; `workers` > 1 parses in spawned processes."""
  name = "symbolic"
  dim = DIM

  def __init__(self, workers: int = 1):
    self.workers = workers

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [len(texts), DIM]; a row of NaN for a text that cannot be read."""
    if self.workers > 1 and len(texts) > 1:
      # Spawned, not forked: abc2xml keeps its parser in module state, and the caller may hold JAX.
      with multiprocessing.get_context("spawn").Pool(self.workers) as pool:
        rows = pool.map(features_or_nan, texts, chunksize=4)
    else:
      rows = [features_or_nan(text) for text in texts]
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, DIM), np.float32)


def features_or_nan(text: str) -> np.ndarray:
  try:
    return features(text)
  except Exception:  # pylint: disable=broad-except  # any unreadable piece becomes a NaN row
    return np.full(DIM, np.nan, np.float32)


def features(text: str) -> np.ndarray:
  """The feature vector of one piece; raises ValueError when it has no K: field or no notes."""
  voices, bar_lengths, tonic = read_piece(text)
  blocks = {
      "pitch_class": _pitch_classes(voices, tonic),
      "interval": _intervals(voices),
      "duration": _durations(voices),
      "onset": _onsets(voices),
      "density": _per_voice(voices, _density, DENSITY_BINS),
      "range": _per_voice(voices, _range, RANGE_BINS),
      "register": _per_voice(voices, _register, REGISTER_BINS),
      **_vertical(voices),
      "bar_length": _soft(bar_lengths, np.ones(len(bar_lengths)), BAR_BINS),
  }
  weight = 1 / np.sqrt(len(blocks))
  return np.concatenate([weight * _unit(blocks[name]) for name in BLOCK_SIZES]).astype(np.float32)


def read_piece(text: str) -> tuple[list[list[Event]], list[float], int]:
  """Note events per voice, each bar's length (first part), and the key signature's major tonic."""
  # abc2xml reads almost any text as notes ("hello" holds an e); a tune has a K: field.
  if not re.search(r"^K:|\[K:", text, re.MULTILINE):
    raise ValueError("no K: field")
  # abc2xml reports every oddity on stderr, and calls pyparsing's deprecated names.
  with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    docs = abc2xml.getXmlDocs(text)
  if not docs:
    raise ValueError("abc2xml could not read it")
  importer = xmlToM21.MusicXMLImporter()
  importer.xmlRootToScore(docs[0], importer.stream)  # staves of one part are added to this stream
  score = importer.stream
  voices: dict[tuple[int, str], list[Event]] = {}
  bar_lengths, meter = [], None
  for part_index, part in enumerate(score.parts):
    for measure in part.getElementsByClass(stream.Measure):
      if part_index == 0:
        meter = measure.timeSignature or meter
        length = meter.barDuration if meter is not None else measure.duration
        bar_lengths.append(float(length.quarterLength))
      # A bar without voices holds the part's first voice directly.
      for voice in measure.voices or [measure]:
        voice_id = str(voice.id) if voice is not measure else "1"
        events = voices.setdefault((part_index, voice_id), [])
        events += _events(voice, float(measure.offset))
  voices_with_notes = [sorted(events) for events in voices.values() if events]
  if not voices_with_notes:
    raise ValueError("no notes")
  signatures = list(score.recurse().getElementsByClass(key.KeySignature))
  tonic = (7 * signatures[0].sharps) % 12 if signatures else 0
  return voices_with_notes, bar_lengths, tonic


def _events(voice: stream.Stream, bar_offset: float) -> list[Event]:
  events = []
  for element in voice.getElementsByClass((note.Note, chord.Chord)):
    length = float(element.duration.quarterLength)
    if element.duration.isGrace or length <= 0:
      continue
    onset = float(element.offset)
    starts = element.tie is None or element.tie.type == "start"
    pitches = tuple(sorted(p.midi for p in element.pitches))
    events.append((bar_offset + onset, length, onset, pitches, starts))
  return events


def _pitch_classes(voices: list[list[Event]], tonic: int) -> np.ndarray:
  """Time-weighted pitch classes, C = the key signature's major tonic."""
  histogram = np.zeros(12)
  for events in voices:
    for _, length, _, pitches, _ in events:
      for pitch in pitches:
        histogram[(pitch - tonic) % 12] += length
  return histogram


def _intervals(voices: list[list[Event]]) -> np.ndarray:
  """Steps between the top pitches of successive notes in each voice."""
  histogram = np.zeros(2 * MAX_INTERVAL + 3)
  for events in voices:
    tops = np.array([pitches[-1] for _, _, _, pitches, starts in events if starts], dtype=int)
    steps = np.clip(np.diff(tops), -MAX_INTERVAL - 1, MAX_INTERVAL + 1) + MAX_INTERVAL + 1
    histogram += np.bincount(steps, minlength=len(histogram))
  return histogram


def _durations(voices: list[list[Event]]) -> np.ndarray:
  lengths = np.array([length for events in voices for _, length, _, _, starts in events if starts])
  steps = np.clip(np.round(2 * np.log2(lengths)), DURATION_STEPS[0], DURATION_STEPS[-1])
  return np.bincount((steps - DURATION_STEPS[0]).astype(int), minlength=len(DURATION_STEPS))


def _onsets(voices: list[list[Event]]) -> np.ndarray:
  """Onsets on the bar line, on other beats, on each common fraction of a beat, elsewhere."""
  histogram = np.zeros(len(ONSET_FRACTIONS) + 2)
  for events in voices:
    for _, _, in_bar, _, starts in events:
      if not starts:
        continue
      near = [i for i, f in enumerate(ONSET_FRACTIONS) if abs(in_bar % 1.0 - f) < 1e-3]
      histogram[0 if in_bar < 1e-3 else near[0] + 1 if near else -1] += 1
  return histogram


def _density(events: list[Event]) -> float | None:
  onsets = sum(starts for *_, starts in events)
  span = max(onset + length for onset, length, *_ in events) - events[0][0]
  return float(np.log2(onsets / span)) if onsets and span > 0 else None


def _range(events: list[Event]) -> float:
  return float(max(e[3][-1] for e in events) - min(e[3][0] for e in events))


def _register(events: list[Event]) -> float:
  return float(np.mean([pitch for *_, pitches, _ in events for pitch in pitches]))


def _per_voice(voices: list[list[Event]], statistic: Callable[[list[Event]], float | None],
               bins: tuple[np.ndarray, float]) -> np.ndarray:
  values = [value for value in map(statistic, voices) if value is not None]
  return _soft(values, np.ones(len(values)), bins)


def _vertical(voices: list[list[Event]]) -> dict[str, np.ndarray]:
  """Time-weighted counts of sounding pitches, and intervals (mod 12) above the lowest of them."""
  notes = [(onset, onset + length, pitch) for events in voices
           for onset, length, _, pitches, _ in events for pitch in pitches]
  starts, ends, pitches = (np.array(column, dtype=float) for column in zip(*notes))
  times = np.unique(np.concatenate([starts, ends]))
  spans = np.diff(times)
  # Each note sounds through a run of consecutive segments [times[k], times[k + 1]); list the
  # (segment, note) pairs directly, as a dense segments x notes mask is too big for long pieces.
  first, stop = np.searchsorted(times, starts), np.searchsorted(times, ends)
  runs = stop - first
  cols = np.repeat(np.arange(len(notes)), runs)
  rows = np.repeat(first, runs) + np.arange(runs.sum()) - np.repeat(np.cumsum(runs) - runs, runs)
  counts = np.bincount(rows, minlength=len(spans))
  lowest = np.full(len(spans), np.inf)
  np.minimum.at(lowest, rows, pitches[cols])
  classes = ((pitches[cols] - lowest[rows]) % 12).astype(int)
  harmony = np.bincount(classes, weights=spans[rows], minlength=12)
  harmony[0] -= spans[counts > 0].sum()  # the lowest pitch is no interval above itself
  return {"sounding": _soft(counts, spans, SOUNDING_BINS), "harmony": np.maximum(harmony, 0.0)}


def _soft(values: Sequence[float], weights: Sequence[float],
          bins: tuple[np.ndarray, float]) -> np.ndarray:
  """A histogram where each value spreads its weight over the bins as a Gaussian bump."""
  centers, width = bins
  values = np.clip(np.asarray(values, dtype=float), centers[0], centers[-1])
  bumps = np.exp(-0.5 * ((centers[None, :] - values[:, None]) / width) ** 2)
  bumps /= bumps.sum(axis=1, keepdims=True)
  return np.asarray(weights, dtype=float) @ bumps


def _unit(histogram: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(histogram)
  return histogram / norm if norm > 0 else np.zeros(len(histogram))
