"""NotaGen's patchilizer: ABC text <-> patches of character ids, bit for bit.

Characters are ASCII codes; a patch holds `patch_size` of them. Bars never span two patches'
boundaries in the sense that a patch never holds two bars, and every line's last patch holds its
`\\n`, which is what makes the stream cut (a suffix of body lines) expressible on ids alone.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Sequence

PAD, BOS, EOS = 0, 1, 2
VOCAB_SIZE = 128
BARLINES = ("|:", "::", ":|", "[|", "||", "|]", "|")
_BARLINE_SPLIT = re.compile("(" + "|".join(map(re.escape, BARLINES)) + ")")
# The fine-tuning encoder starts the body at the first line containing `[V:`; the DPO encoder reads
# generated text that already carries stream markers and starts at the first line beginning `[r:`.
BODY_RULES = ("contains_voice", "starts_voice", "starts_marker")


def text_lines(text: str) -> list[str]:
  """Non-empty lines, each with its `\\n` back (the last one too)."""
  return [line + "\n" for line in text.split("\n") if line]


def body_index(lines: Sequence[str], rule: str = "contains_voice") -> int:
  """Index of the first tune-body line, or -1 (the original then takes the last line as body)."""
  if rule not in BODY_RULES:
    raise ValueError(f"body rule {rule!r} is not one of {BODY_RULES}")
  for i, line in enumerate(lines):
    if ((rule == "contains_voice" and "[V:" in line)
        or (rule == "starts_voice" and line.startswith("[V:"))
        or (rule == "starts_marker" and line.startswith("[r:"))):
      return i
  return -1


def stream_marker(line_index: int, n_lines: int) -> str:
  return f"[r:{line_index}/{n_lines - line_index - 1}]"


def split_line_bars(line: str) -> list[str] | None:
  """Bars of one body line, each starting with the barline before it; None where the original fails.

  The original pairs (barline, text) items and glues a last bar without `V` to the one before; when
  the items do not pair up, or there is no bar to glue to, it raises and drops this line and every
  later one. Returning None lets the caller reproduce exactly that.
  """
  items = [item for item in _BARLINE_SPLIT.split(line) if item]
  if len(items) == 1:
    return items
  start = 0 if items[0] in BARLINES else 1
  if (len(items) - start) % 2:
    return None
  bars = items[:start] + [items[i] + items[i + 1] for i in range(start, len(items), 2)]
  if "V" not in bars[-1]:
    if len(bars) < 2:
      return None
    bars = bars[:-2] + [bars[-2] + bars[-1]]
  return bars


def split_bars(lines: Sequence[str]) -> list[str]:
  bars: list[str] = []
  for line in lines:
    line_bars = split_line_bars(line)
    if line_bars is None:
      break
    bars += line_bars
  return bars


def chunk(text: str, patch_size: int, close: bool = True) -> list[str]:
  """Cuts text into patch_size pieces; a closed text not filling its last piece gets an eos char."""
  if close and len(text) % patch_size:
    text += chr(EOS)
  return [text[i:i + patch_size] for i in range(0, len(text), patch_size)]


def stream_cut_points(body_patches: Sequence[str]) -> list[int]:
  """Body patch indices where a body line starts: 0 and one past every patch holding `\\n`."""
  return [0] + [i + 1 for i, patch in enumerate(body_patches) if "\n" in patch]


def choose_stream_start(cut_points: Sequence[int], n_total: int, patch_length: int,
                        rng: random.Random) -> int:
  """The body patch index the original's stream cut starts from (0 = no cut).

  Same draws, in the same order, as the original: one `rng.choice` among head/tail/middle (made even
  when only head is allowed), and for middle a second `rng.choice` of an inner cut point.
  """
  if n_total <= patch_length:
    return 0
  overflow = n_total - patch_length
  n_allowed = next((k + 1 for k, point in enumerate(cut_points) if point >= overflow),
                   len(cut_points))
  options = ["head", "tail", "middle"][:min(n_allowed, 3)]
  choice = rng.choice(options)
  if choice == "head":
    return 0
  if choice == "tail":
    return cut_points[n_allowed - 1]
  return cut_points[rng.choice(range(1, n_allowed - 1))]


@dataclasses.dataclass(frozen=True)
class Encoding:
  """A full (uncut) training encoding as patches of text, with what the stream cut needs."""
  metadata: list[str]  # bos patch first
  body: list[str]  # eos patch last
  cut_points: list[int]

  def patches(self, start: int = 0) -> list[str]:
    return self.metadata + self.body[start:]


@dataclasses.dataclass(frozen=True)
class Patchilizer:
  patch_size: int = 16
  patch_length: int = 2048

  @property
  def bos_patch(self) -> str:
    return chr(BOS) * (self.patch_size - 1) + chr(EOS)

  @property
  def eos_patch(self) -> str:
    return chr(BOS) + chr(EOS) * (self.patch_size - 1)

  def _check_ascii(self, text: str) -> None:
    for i, char in enumerate(text):
      if ord(char) >= VOCAB_SIZE:
        raise ValueError(
            f"non-ASCII character {char!r} at offset {i}: the vocabulary is ASCII "
            "(prepare transliterates with unidecode)")

  def _body_patches(self, body_lines: Sequence[str]) -> list[str]:
    return [p for bar in split_bars(body_lines) for p in chunk(bar, self.patch_size)]

  def full_encoding(self, text: str, stream: bool = True,
                    body_rule: str = "contains_voice") -> Encoding:
    """Metadata and body patches before any cut; `stream` adds the `[r:i/j]` line markers."""
    self._check_ascii(text)
    lines = text_lines(text)
    split = body_index(lines, body_rule)
    metadata_lines, body_lines = lines[:split], lines[split:]
    if stream:
      body_lines = [stream_marker(i, len(body_lines)) + line for i, line in enumerate(body_lines)]
    metadata = [self.bos_patch] + [p for line in metadata_lines
                                   for p in chunk(line, self.patch_size)]
    body = self._body_patches(body_lines) + [self.eos_patch]
    return Encoding(metadata, body, stream_cut_points(body))

  def encode_train(self, text: str, rng: random.Random | None = None, stream: bool = True,
                   body_rule: str = "contains_voice") -> list[list[int]]:
    """The training encoding: bos, metadata, (a suffix of) the body lines, eos; patch_length at most.

    With `rng`, a piece longer than patch_length gets the original's random stream cut; without,
    it is cut at the head (plain truncation), which is what scoring a whole piece wants.
    """
    encoding = self.full_encoding(text, stream=stream, body_rule=body_rule)
    start = 0
    if rng is not None and stream:
      start = choose_stream_start(encoding.cut_points,
                                  len(encoding.metadata) + len(encoding.body),
                                  self.patch_length, rng)
    return self.to_ids(encoding.patches(start)[:self.patch_length])

  def encode_generate(self, text: str) -> list[list[int]]:
    """A prompt to continue: no markers added, the last bar left open (no eos, not padded)."""
    self._check_ascii(text)
    lines = [line for line in text.split("\n") if line]
    split = next((i for i, line in enumerate(lines)
                  if line.startswith("[V:") or line.startswith("[r:")), None)
    metadata_lines, body_lines = lines[:split], lines[split:]
    if not body_lines:
      raise ValueError("a generation prompt needs at least one line")
    metadata = [self.bos_patch] + [p for line in metadata_lines
                                   for p in chunk(line + "\n", self.patch_size)]
    open_last = not text.endswith("\n")
    body_lines = [line + "\n" for line in body_lines[:-1]] + [
        body_lines[-1] + ("" if open_last else "\n")]
    bars = split_bars(body_lines)
    if not bars:
      raise ValueError("the prompt's body has no bar the original could split")
    body = [p for bar in bars[:-1] for p in chunk(bar, self.patch_size)]
    body += chunk(bars[-1], self.patch_size, close=False)
    patches = (metadata + body)[:self.patch_length]
    ids = []
    for patch in patches:
      codes = [ord(c) for c in patch]
      if len(patch) == self.patch_size or patch[-1] == chr(EOS):
        codes += [PAD] * (self.patch_size - len(patch))
      ids.append(codes)
    return ids

  def to_ids(self, patches: Sequence[str]) -> list[list[int]]:
    return [[ord(c) for c in p] + [PAD] * (self.patch_size - len(p)) for p in patches]

  def decode(self, ids: Sequence[Sequence[int]]) -> str:
    """Each patch's characters up to its first eos (pad and bos before it are kept)."""
    out = []
    for patch in ids:
      for code in patch:
        if code == EOS:
          break
        out.append(chr(code))
    return "".join(out)
