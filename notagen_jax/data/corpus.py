"""Where pieces come from: folders of scores, music21's bundled corpus, and metadata tables.

A `PieceSource` names one piece (a file, or one tune of a multi-tune ABC file) and knows how to
turn it into standard ABC: MusicXML goes straight to xml2abc; Humdrum and ABC tunes are read by
music21 and written as MusicXML first, so every piece reaches the cleaning step in the same form.
An ABC tune already interleaved (what `prepare` and generation write) is de-interleaved instead.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
from typing import Iterable, Iterator, Mapping

from abctoolkit.rotate import unrotate_abc
from abctoolkit.utils import Barline_regexPattern
from etils import epath

from notagen_jax import storage
from notagen_jax.data import abc

MUSICXML_SUFFIXES = (".xml", ".mxl", ".musicxml")
MUSIC21_SUFFIXES = (".krn", ".abc")
SUPPORTED_SUFFIXES = MUSICXML_SUFFIXES + MUSIC21_SUFFIXES
MUSIC21_KEYWORD = "music21"
PROMPT_FIELDS = ("period", "composer", "instrumentation")

# music21's corpus folders -> (composer as NotaGen writes names, period).
MUSIC21_COMPOSERS: Mapping[str, tuple[str, str]] = {
    "bach": ("Bach, Johann Sebastian", "Baroque"),
    "handel": ("Handel, George Frideric", "Baroque"),
    "corelli": ("Corelli, Arcangelo", "Baroque"),
    "monteverdi": ("Monteverdi, Claudio", "Renaissance"),
    "palestrina": ("Palestrina, Giovanni Pierluigi da", "Renaissance"),
    "josquin": ("Josquin des Prez", "Renaissance"),
    "luca": ("Marenzio, Luca", "Renaissance"),
    "lusitano": ("Lusitano, Vicente", "Renaissance"),
    "trecento": ("Trecento (various)", "Medieval"),
    "ciconia": ("Ciconia, Johannes", "Medieval"),
    "cpebach": ("Bach, Carl Philipp Emanuel", "Classical"),
    "haydn": ("Haydn, Joseph", "Classical"),
    "mozart": ("Mozart, Wolfgang Amadeus", "Classical"),
    "beethoven": ("Beethoven, Ludwig van", "Classical"),
    "weber": ("Weber, Carl Maria von", "Romantic"),
    "schubert": ("Schubert, Franz", "Romantic"),
    "schumann_robert": ("Schumann, Robert", "Romantic"),
    "schumann_clara": ("Schumann, Clara", "Romantic"),
    "chopin": ("Chopin, Frederic", "Romantic"),
    "verdi": ("Verdi, Giuseppe", "Romantic"),
    "beach": ("Beach, Amy", "Romantic"),
    "liliuokalani": ("Liliuokalani", "Romantic"),
    "joplin": ("Joplin, Scott", "Romantic"),
    "johnson_j_r": ("Johnson, J. Rosamond", "20th Century"),
    "schoenberg": ("Schoenberg, Arnold", "20th Century"),
    "webern": ("Webern, Anton", "20th Century"),
    "essenFolksong": ("Traditional", "Folk"),
    "ryansMammoth": ("Traditional", "Folk"),
    "oneills1850": ("Traditional", "Folk"),
    "airdsAirs": ("Traditional", "Folk"),
    "miscFolk": ("Traditional", "Folk"),
    "nottingham-dataset": ("Traditional", "Folk"),
}

_VOCAL_NAMES = re.compile(
    r"\b(soprano|alto|altus|tenor|tenore|bass|basso|bassus|cantus|canto|quintus|sextus|"
    r"septimus|discantus|superius|contratenor|voice|voce|vox|choir|chor|chorus|coro|sop|mezzo|"
    r"baritone|[SATB])\b", re.IGNORECASE)
_KEYBOARD_NAMES = re.compile(r"piano|pianoforte|harpsichord|cembalo|organ|keyboard|clavier|pno",
                             re.IGNORECASE)
_ORCHESTRAL_PARTS = 10


@dataclasses.dataclass(frozen=True)
class PieceSource:
  """One piece: `path` (local or remote), `tune` (1-based) for a tune of a multi-tune ABC file."""
  piece_id: str
  path: str
  tune: int = 0
  metadata: tuple[tuple[str, str], ...] = ()

  def to_standard_abc(self) -> str:
    """The piece as xml2abc's standard ABC (raises `abc.PieceError`)."""
    suffix = _suffix(self.path)
    if suffix in MUSICXML_SUFFIXES:
      data = storage.path(self.path).read_bytes()
      if not data.strip():
        raise abc.PieceError("empty file")
      return abc.musicxml_to_abc(data, self.path)
    if suffix == ".abc":
      tune = abc_tune(self.path, self.tune)
      if is_interleaved(tune):
        return deinterleave(tune)
      return abc.musicxml_to_abc(_music21_to_musicxml(tune, "abc"))
    if suffix == ".krn":
      with storage.local_copy(self.path) as local:  # music21 reads Humdrum from a file
        return abc.musicxml_to_abc(_music21_to_musicxml(local, "humdrum"))
    raise abc.PieceError(f"unsupported file type {suffix!r}")


def _suffix(path: str) -> str:
  return os.path.splitext(path)[1].lower()


def _music21_to_musicxml(source: str | pathlib.Path, fmt: str) -> bytes:
  from music21 import converter, stream  # pylint: disable=import-outside-toplevel
  from music21.musicxml import m21ToXml  # pylint: disable=import-outside-toplevel
  if isinstance(source, pathlib.Path) and source.stat().st_size == 0:
    raise abc.PieceError("empty file")
  try:
    score = converter.parse(source, format=fmt)
    if isinstance(score, stream.Opus):
      score = score.scores[0]
    return m21ToXml.GeneralObjectExporter(score).parse()
  except Exception as error:  # music21 raises many kinds on malformed input
    raise abc.PieceError(f"music21 could not read it: {type(error).__name__}: {error}") from error


def dedupe(sources: Iterable[PieceSource]) -> tuple[list[PieceSource], list[dict[str, str]]]:
  """One source per piece id: the same piece in several formats (bwv277.krn and bwv277.mxl) is
  prepared once, from MusicXML first (xml2abc reads it directly), then Humdrum, then ABC.
  Returns the sources kept and, for each file left out, which one stands for it."""
  rank = {suffix: i for i, suffix in enumerate(MUSICXML_SUFFIXES + (".krn", ".abc"))}
  by_id: dict[str, list[PieceSource]] = {}
  for source in sources:
    by_id.setdefault(source.piece_id, []).append(source)
  kept, left_out = [], []
  for group in by_id.values():
    group.sort(key=lambda s: (rank[_suffix(s.path)], s.path))
    kept.append(group[0])
    left_out += [{"file": s.path, "piece_id": s.piece_id, "same_piece_as": group[0].path}
                 for s in group[1:]]
  return kept, left_out


def split_abc_tunes(text: str) -> list[str]:
  """The tunes of an ABC file: each starts at an `X:` line; text before the first is dropped."""
  tunes, current = [], None
  for line in text.splitlines(keepends=True):
    if line.startswith("X:"):
      if current is not None:
        tunes.append("".join(current))
      current = [line]
    elif current is not None:
      current.append(line)
  if current is not None:
    tunes.append("".join(current))
  if not tunes and text.strip():
    tunes = [text]  # a single tune without X: is still a tune
  return tunes


def abc_tune(path: str, tune: int) -> str:
  text = storage.path(path).read_bytes().decode("utf-8", errors="replace")
  tunes = split_abc_tunes(text)
  if not tunes:
    raise abc.PieceError("empty file")
  if not 1 <= tune <= len(tunes):
    raise abc.PieceError(f"tune {tune} not found ({len(tunes)} tunes)")
  if not tunes[tune - 1].strip():
    raise abc.PieceError("empty tune")
  return tunes[tune - 1]


_BODY_LINE = re.compile(r"^(\[r:[^\]]*\])?\[V:")
_HEADER_LINE = re.compile(r"^([A-Za-z+]:|%|\s*$)")
_STREAM_MARKER_ONLY = re.compile(r"^\[r:[^\]]*\]\s*$")
_VOICE_TAG = re.compile(r"\[V:[^\]]*\]")
_BARLINE = re.compile(Barline_regexPattern)


def is_interleaved(text: str) -> bool:
  """Whether an ABC text is in the interleaved form that `prepare`, generation and the corpus's
  interleaved/ files hold: a header (fields, `%` comments, the rest of a `V:` line's quoted name
  broken across lines) declaring the voices by `V:` lines, then body lines of one bar per voice,
  each after its `[V:` tag (in generated text after an `[r:i/j]` stream marker; rest reduction
  leaves empty or marker-only lines).

  A standard ABC tune that merely starts its lines with `[V:1]` tags holds several bars a line and
  is not interleaved: music21 reads it.
  """
  lines = text.rstrip("\n").split("\n")
  start = next((i for i, line in enumerate(lines) if _BODY_LINE.match(line)), None)
  if start is None:
    return False
  header = lines[:start]
  if not any(line.startswith("V:") for line in header):
    return False
  if any("[V:" in line or not _HEADER_LINE.match(line) and _BARLINE.search(line)
         for line in header):
    return False  # music before the body (a line that is not a field, nor a name's continuation)
  for line in lines[start:]:
    if not line.strip() or _STREAM_MARKER_ONLY.match(line):
      continue
    if not _BODY_LINE.match(line):
      return False
    bars = _VOICE_TAG.split(line)[1:]
    if any(_BARLINE.search(abc.split_barlines(bar, first_line=True)[1]) for bar in bars):
      return False  # a voice holds more than one bar
  return True


def deinterleave(text: str) -> str:
  """An interleaved (or rest-reduced, generated) text as standard ABC, voice after voice.

  music21 would read the interleaved voices as one; this is the text that cleaning and
  interleaving turn back into the same interleaved form. `%` prompt lines are dropped, as
  the prompt comes from a piece's metadata.
  """
  lines = abc.unreduce(text).splitlines(keepends=True)
  lines = [line for line in lines if not (line.startswith("%") and not line.startswith("%%"))]
  try:
    return "".join(unrotate_abc(lines))
  except Exception as error:  # abctoolkit raises anything on odd text
    raise abc.PieceError(f"cannot de-interleave: {type(error).__name__}: {error}") from error


def piece_id_for(relative_path: str, tune: int = 0) -> str:
  stem = os.path.splitext(relative_path)[0].replace(os.sep, "/")
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "__"))
  return f"{name}__{tune}" if tune else name


def sources_in(root: str | os.PathLike, files: Iterable[epath.Path],
               metadata_for=lambda rel: {}) -> Iterator[PieceSource]:
  root = storage.path(root)
  for path in sorted(files, key=os.fspath):
    rel = str(path.relative_to(root))
    meta = tuple(sorted(metadata_for(rel).items()))
    if path.suffix.lower() == ".abc":
      text = path.read_bytes().decode("utf-8", errors="replace")
      for tune in range(1, len(split_abc_tunes(text)) + 1):
        yield PieceSource(piece_id_for(rel, tune), str(path), tune, meta)
      if not text.strip():
        yield PieceSource(piece_id_for(rel, 1), str(path), 1, meta)
    else:
      yield PieceSource(piece_id_for(rel), str(path), 0, meta)


def file_sources(path: str | os.PathLike) -> list[PieceSource]:
  """The pieces of one score file: one per tune of an ABC file, else one."""
  file = storage.path(path)
  if not file.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  if file.suffix.lower() not in SUPPORTED_SUFFIXES:
    raise ValueError(f"{path}: not a score file (one of {', '.join(SUPPORTED_SUFFIXES)})")
  return list(sources_in(file.parent, [file]))


def folder_sources(folder: str | os.PathLike, index: str | None = None) -> Iterator[PieceSource]:
  """Every supported score under `folder`; metadata from an optional CSV/JSONL index."""
  folder = storage.path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"input folder {str(folder)!r} does not exist")
  table = load_metadata_index(index) if index else {}

  def metadata_for(rel: str) -> dict[str, str]:
    for key in (rel, rel.replace(os.sep, "/"), pathlib.Path(rel).stem, piece_id_for(rel)):
      if key in table:
        return table[key]
    return {}

  files = [p for p in storage.files_under(folder) if p.suffix.lower() in SUPPORTED_SUFFIXES]
  return sources_in(folder, files, metadata_for)


def music21_corpus_root() -> pathlib.Path:
  import music21  # pylint: disable=import-outside-toplevel
  return pathlib.Path(music21.__file__).parent / "corpus"


def music21_sources() -> Iterator[PieceSource]:
  """music21's bundled corpus (Bach, Palestrina, Monteverdi, Mozart, ..., folk collections)."""
  root = music21_corpus_root()
  files = [p for p in storage.files_under(root) if p.suffix.lower() in SUPPORTED_SUFFIXES]

  def metadata_for(rel: str) -> dict[str, str]:
    folder = rel.split(os.sep)[0]
    if folder not in MUSIC21_COMPOSERS:
      return {}
    composer, period = MUSIC21_COMPOSERS[folder]
    return {"composer": composer, "period": period}

  return sources_in(root, files, metadata_for)


def load_metadata_index(path: str | os.PathLike) -> dict[str, dict[str, str]]:
  """A user's index: CSV or JSONL rows with `path` (or `file` / `piece_id`) and prompt fields."""
  path = storage.path(path)
  if not path.is_file():
    raise FileNotFoundError(f"metadata index {str(path)!r} does not exist")
  if path.suffix.lower() == ".csv":
    # Bytes, then text with no newline translation, as the csv module wants its input.
    rows = list(csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))
  else:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as error:
          raise ValueError(f"{path}:{number}: not a JSON object: {error}") from error
  table = {}
  for number, row in enumerate(rows, 1):
    key = row.get("path") or row.get("file") or row.get("piece_id")
    if not key:
      raise ValueError(f"{path}: row {number} has no 'path', 'file' or 'piece_id'")
    table[str(key)] = {field: str(row[field]) for field in PROMPT_FIELDS if row.get(field)}
  return table


def instrumentation(standard_abc: str) -> str:
  """NotaGen-style instrumentation from the voice names of a standard ABC header."""
  names = re.findall(r'^V:\S+.*?nm="([^"]*)"', standard_abc, re.MULTILINE)
  n_voices = len(set(re.findall(r"^V:(\S+)", standard_abc, re.MULTILINE)))
  vocal = [n for n in names if _VOCAL_NAMES.search(n)]
  keyboard = [n for n in names if _KEYBOARD_NAMES.search(n)]
  others = [n for n in names if n not in vocal and n not in keyboard]
  if vocal and len(vocal) * 2 >= len(names) and not keyboard:
    return "Choral" if len(vocal) > 1 else "Vocal"
  if vocal and keyboard and not others:
    return "Art Song"
  if vocal:
    return "Vocal-Orchestral" if len(names) >= _ORCHESTRAL_PARTS else "Art Song"
  if keyboard and not others:
    return "Keyboard"
  if len(names) >= _ORCHESTRAL_PARTS:
    return "Orchestral"
  if len(names) > 1 or n_voices > 1:
    return "Chamber"
  return "Melody"


def prompt_lines(metadata: Mapping[str, str]) -> str:
  """The three `%` conditioning lines, or '' when period or composer is unknown."""
  if not all(metadata.get(field) for field in PROMPT_FIELDS):
    return ""
  return "".join(f"%{metadata[field]}\n" for field in PROMPT_FIELDS)


def split_of(piece_id: str, eval_fraction: float) -> str:
  """Deterministic train/eval assignment from a hash of the piece id."""
  digest = int.from_bytes(hashlib.sha1(piece_id.encode()).digest()[:8], "big")
  return "eval" if digest / 2**64 < eval_fraction else "train"
