"""Score -> standard ABC -> cleaned -> interleaved -> transposed -> rest-reduced, as NotaGen does.

Each step is a plain function over text or lines, so that the preparation entry point, the scorer
(which reads interleaved ABC) and generation (which un-reduces) share one implementation. A piece
that a step cannot handle raises `PieceError` with the reason; callers record and skip it.
"""

from __future__ import annotations

import collections
import contextlib
import fractions
import io
import re
import types
import warnings
import zipfile
from typing import Sequence

from abctoolkit import transpose as _transpose
from abctoolkit import xml2abc as _xml2abc
from abctoolkit.check import check_alignment_unrotated
from abctoolkit.duration import calculate_bartext_duration
from abctoolkit.rotate import rotate_abc
from abctoolkit.utils import (Barline_regexPattern, Barlines, Quote_re,
                              extract_barline_and_bartext_dict, extract_global_and_local_metadata,
                              extract_metadata_and_parts, remove_bar_no_annotations,
                              remove_information_field)
from unidecode import unidecode

# The 15 key signatures of the augmentation, in the original's order.
KEYS = ("Cb", "C", "C#", "Db", "D", "Eb", "E", "F", "F#", "Gb", "G", "Ab", "A", "Bb", "B")
REMOVED_FIELDS = ("X:", "T:", "C:", "W:", "w:", "Z:", "%%MIDI")
REST_CHARS = frozenset("zZxX")
MAX_ANNOTATION_CHARS = 40


class PieceError(ValueError):
  """A piece that cannot go through the pipeline; the message says why."""


def major_key(key_field: str) -> str:
  """The major key sharing a K: field's signature ('Am' -> 'C', 'Ddor' -> 'C'); 'none' counts as C."""
  if key_field in ("", "none"):
    return "C"
  return _transpose.lookup_key_according_to_keymode(key_field)


def key_semitone(key: str) -> int:
  """Pitch class of a major key name (C = 0)."""
  return _transpose.Key2index[key]


def musicxml_to_abc(data: bytes, name: str = "piece.xml") -> str:
  """abctoolkit's xml2abc as `-d 8 -c 6 -x` (unit length 1/8, credit filter 6, no line breaks).

  Runs in-process (the converter keeps its output object in a module global, as its command line
  does); `data` is MusicXML bytes or a compressed .mxl archive.
  """
  if data[:2] == b"PK":
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      members = [n for n in archive.namelist()
                 if not n.startswith("META") and n.lower().endswith((".xml", ".musicxml"))]
      if not members:
        raise PieceError(f"{name}: .mxl archive holds no MusicXML file")
      data = archive.read(members[0])
  options = types.SimpleNamespace(u=False, m=0, c=6, d=8, n=0, b=0, o="", v=0, x=True, p=[],
                                  j=False, t=False, s=False, v1=False, ped=True, stm=False, i=False)
  output, messages = io.StringIO(), io.StringIO()
  writer = _xml2abc.ABCoutput(name, "", 0, options)
  writer.outfile = output
  _xml2abc.abcOut = writer
  with contextlib.redirect_stderr(messages):
    try:
      _xml2abc.Parser(options).parse(io.BytesIO(data))
    except Exception as error:  # the converter raises anything on malformed input
      raise PieceError(f"xml2abc failed: {type(error).__name__}: {error}") from error
  text = output.getvalue()
  if not text.strip():
    raise PieceError("xml2abc wrote nothing: " + messages.getvalue().strip()[-200:])
  return text


def clean(abc_text: str) -> list[str]:
  """NotaGen's cleaning of a standard ABC text; returns lines (each ending in `\\n`)."""
  lines = [line for line in abc_text.splitlines(keepends=True) if line.strip()]
  lines = [unidecode(line) for line in lines]
  lines = remove_information_field(lines, list(REMOVED_FIELDS))
  try:
    lines = remove_bar_no_annotations(lines)
  except Exception as error:
    raise PieceError(f"no tune body (V:1 line): {error}") from error
  lines = [line if re.search(r"^[A-Za-z]:", line) or line.startswith("%")
           else line.replace('\\"', "") for line in lines]
  lines = [_drop_annotations_with_barlines(line) for line in lines]
  try:
    _, _, _, bars, _ = extract_barline_and_bartext_dict(lines)
  except Exception as error:
    raise PieceError(f"cannot split into bars: {type(error).__name__}: {error}") from error
  counts = {voice: len(texts) for voice, texts in bars.items()}
  if len(set(counts.values())) > 1:
    raise PieceError(f"voices have different bar counts: {counts}")
  # The original rejects a piece whose alignment check raises (its bar-duration parser fails on
  # some notation), so the check runs for that effect alone.
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every odd bar duration
      check_alignment_unrotated(lines)
  except Exception as error:
    raise PieceError(f"bar check failed: {type(error).__name__}: {error}") from error
  return [_tidy_annotations(line) for line in lines]


def _drop_annotations_with_barlines(line: str) -> str:
  for quoted in re.findall(Quote_re, line):
    if any(barline in quoted for barline in Barlines):
      line = line.replace(quoted, "")
  return line


def _tidy_annotations(line: str) -> str:
  """Empty "" go; ^/_ annotations lose repeated symbols and go when still longer than 40."""
  for quoted in re.findall(r'"[^"]*"', line):
    if quoted == '""':
      line = line.replace(quoted, "")
    if quoted[1] in "^_":
      tidy = re.sub(r"([^a-zA-Z0-9])\1+", r"\1", quoted)
      line = line.replace(quoted, tidy if len(tidy) <= MAX_ANNOTATION_CHARS else "")
  return line


def interleave(lines: Sequence[str]) -> str:
  """One body line per bar index holding that bar of every voice (abctoolkit's rotation)."""
  try:
    return "".join(rotate_abc(list(lines)))
  except Exception as error:
    raise PieceError(f"interleaving failed: {type(error).__name__}: {error}") from error


def original_key(lines: Sequence[str]) -> str:
  """The global K: field ('none' -> 'C'), as the original's index records it."""
  metadata_lines, _ = extract_metadata_and_parts(list(lines))
  global_fields, _ = extract_global_and_local_metadata(metadata_lines)
  key = global_fields.get("K", ["none"])[0]
  return "C" if key == "none" else key


def transpose(lines: Sequence[str], key: str) -> list[str]:
  """The piece in another key signature (abctoolkit), as non-empty lines ending in `\\n`."""
  try:
    text = _transpose.transpose_an_abc_text(list(lines), key)
  except Exception as error:
    raise PieceError(f"transposition to {key} failed: {type(error).__name__}: {error}") from error
  return [line + "\n" for line in text.split("\n") if line]


def _has_notes(bar_text: str) -> bool:
  return any(char.isalpha() and char not in REST_CHARS for char in bar_text)


def rest_reduce(lines: Sequence[str]) -> str:
  """Interleaved form keeping, per line, only voices whose bar has a note (NotaGen's training form)."""
  metadata, prefix, left, bars, right = extract_barline_and_bartext_dict(list(lines))
  out = list(metadata)
  for i in range(len(bars["V:1"])):
    line = ""
    for voice in prefix:
      if not _has_notes(bars[voice][i]):
        continue
      if i == 0:
        line += f"[{voice}]{prefix[voice]}{left[voice][0]}{bars[voice][0]}{right[voice][0]}"
      else:
        line += f"[{voice}]{bars[voice][i]}{right[voice][i]}"
    out.append(line + "\n")
  return "".join(out)


def augment(lines: Sequence[str]) -> dict[str, str]:
  """The rest-reduced training text in each of the 15 keys."""
  return {key: rest_reduce(transpose(lines, key)) for key in KEYS}


_STREAM_MARKER = re.compile(r"^\[r:[^\]]*\]")
_VOICE_TAG = re.compile(r"\[V:([^\]]*)\]")
_LEADING_BARLINE = re.compile(r"^\s*(?:\[[A-Za-z]:[^\]]*\]\s*)*" + Barline_regexPattern)


def unreduce(text: str) -> str:
  """The interleaved piece of a rest-reduced (generated) text: every body line gets every voice.

  As the original's `rest_unreduce` (inference/inference.py): the body starts at the first line
  containing `[V:`; `[r:i/j]` stream markers are stripped; voices are the header's `V:` lines in
  numeric order; a voice missing from a line gets a whole-bar rest, `z` for the first voice of each
  `( ... )` group of `%%score` (and for ungrouped voices), `x` for the others, lasting the most
  common bar duration among the voices present in that line (the previous line's when none can be
  measured), closed by the right barline of the last voice present. Where the original leaves
  gaps this writes what an aligned piece has: a one-unit rest as `z` (xml2abc's spelling, not
  `z1`), bars of no length left out of the count, the first line's left barline given to the
  missing voices too, the header's meter over unit length before any bar is measured, and rests
  in every voice for a line without voices: rest reduction's all-rest bar, an empty line (also
  before the first voice line) or, in generated text, a bare stream marker. Empty lines at the
  end are dropped (an all-rest last bar is lost, as in the original, whose encoder drops empty
  lines).
  Raises `PieceError` when the text has no body or no declared voices, or when a body line holds
  text before its first voice, a voice twice, a voice the header does not declare, or needs a rest
  whose length cannot be known.
  """
  lines = text.rstrip("\n").split("\n")
  start = next((i for i, line in enumerate(lines) if "[V:" in line), None)
  if start is None:
    raise PieceError("no tune body (no line contains [V:)")
  while start and not lines[start - 1].strip():
    start -= 1  # rest reduction writes an all-rest first bar as an empty line
  metadata = [line for line in lines[:start] if line]
  voices, rest_char = _declared_voices(metadata)
  bar_units = _header_bar_units(metadata)
  out = [line + "\n" for line in metadata]
  right = "|"
  for number, line in enumerate(lines[start:]):
    bars = voice_bars(_STREAM_MARKER.sub("", line), number)
    unknown = [voice for voice in bars if voice not in rest_char]
    if unknown:
      raise PieceError(f"body line {number}: voice {unknown[0]} is not declared in the header")
    durations, left, right = _measure(bars, number == 0, right)
    if durations:
      bar_units = collections.Counter(durations).most_common(1)[0][0]
    body = ""
    for voice in voices:
      if voice in bars:
        body += f"[{voice}]{bars[voice]}"
        continue
      if bar_units is None:
        raise PieceError(f"body line {number}: {voice} needs a rest but no bar length is known")
      body += f"[{voice}]{left}{rest_char[voice]}{_length(bar_units)}{right}"
    out.append(body + "\n")
  return "".join(out)


def _measure(bars: dict[str, str], first_line: bool,
             right: str) -> tuple[list[fractions.Fraction], str, str]:
  """A line's non-zero bar durations, and its barlines for the voices it lacks.

  The barlines are those of the last voice that has them: the left one on the first line only, the
  right one or, when no voice has one, the previous line's (`right`).
  """
  durations, left = [], ""
  for bar in bars.values():
    bar_left, content, bar_right = split_barlines(bar, first_line)
    left, right = bar_left or left, bar_right or right
    duration = bar_duration(content)
    if duration:
      durations.append(duration)
  return durations, left, right


def split_barlines(bar: str, first_line: bool) -> tuple[str, str, str]:
  """One voice's bar of a body line as (left barline, content, right barline), "" where absent.

  The right barline is the last one and what follows it (a volta number); a left barline is read
  on the piece's first line only, as abctoolkit writes it there alone.
  """
  left, right, content = "", "", bar
  parts = re.split(Barline_regexPattern, bar)
  if len(parts) > 2:
    right = "".join(parts[-2:])
    content = bar[:-len(right)]
  leading = _LEADING_BARLINE.match(content) if first_line else None
  if leading:
    left, content = leading.group(1), content[leading.end():]
  return left, content, right


def _declared_voices(metadata: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """Header voices in numeric order, and each one's whole-bar rest letter."""
  grouped = []
  for line in metadata:
    if line.startswith("%%score"):
      grouped += [group.split() for group in re.findall(r"\((.*?)\)", line)]
  voices = [line.split()[0] for line in metadata if line.startswith("V:")]
  if not voices:
    raise PieceError("the header declares no voice (V: line)")
  if any(not voice[2:].isdigit() for voice in voices):
    raise PieceError(f"voice ids must be numbers: {voices}")
  secondary = {"V:" + number for group in grouped for number in group[1:]}
  rest_char = {voice: "x" if voice in secondary else "z" for voice in voices}
  return sorted(set(voices), key=lambda voice: int(voice[2:])), rest_char


def voice_bars(line: str, number: int) -> dict[str, str]:
  """Each voice's text in one interleaved body line (no stream marker), in the line's order."""
  parts = _VOICE_TAG.split(line)
  if parts[0].strip():
    raise PieceError(f"body line {number}: text before the first voice: {parts[0][:40]!r}")
  bars = {}
  for voice, bar in zip(parts[1::2], parts[2::2]):
    if "V:" + voice in bars:
      raise PieceError(f"body line {number}: voice V:{voice} appears twice")
    bars["V:" + voice] = bar
  return bars


def bar_duration(bar_text: str) -> fractions.Fraction | None:
  """A bar's length in unit note lengths as abctoolkit counts it (as the original), None if it
  cannot."""
  with contextlib.redirect_stdout(io.StringIO()):  # it prints every bar it cannot read
    try:
      duration = calculate_bartext_duration(bar_text)
    except Exception:  # pylint: disable=broad-except  # its parser raises anything on odd text
      return None
  return fractions.Fraction(duration) if duration is not None else None


def _header_bar_units(metadata: Sequence[str]) -> fractions.Fraction | None:
  """M: over L: (unit length 1/8 when absent), None for free meter."""
  fields = {line[0]: line[2:].strip() for line in metadata if re.match(r"^[ML]:", line)}
  meter = {"C": "4/4", "C|": "2/2"}.get(fields.get("M", ""), fields.get("M", ""))
  try:
    return fractions.Fraction(meter) / fractions.Fraction(fields.get("L", "1/8"))
  except (ValueError, ZeroDivisionError):
    return None


def _length(units: fractions.Fraction) -> str:
  return "" if units == 1 else str(units)


def to_musicxml(text: str) -> str:
  """MusicXML of an (interleaved, un-reduced) ABC tune, with abctoolkit's abc2xml."""
  with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()) as messages:
    # abc2xml builds its grammar with pyparsing's deprecated names and reports oddities on stderr.
    warnings.simplefilter("ignore", DeprecationWarning)
    from abctoolkit import abc2xml  # pylint: disable=import-outside-toplevel
    docs = abc2xml.getXmlDocs(text)
  if not docs:
    detail = messages.getvalue().strip().splitlines()
    raise PieceError("abc2xml could not read the tune" + (f": {detail[-1]}" if detail else ""))
  return abc2xml.fixDoctype(docs[0])
