"""Generated pieces as something to look at and listen to: SVG sheet music and audio.

Verovio engraves the MusicXML a piece was written as (where none was written, the MusicXML its
un-reduced ABC converts to), one SVG per page. FluidSynth with a General MIDI soundfont plays the
MIDI to Ogg Vorbis where both are installed; without them a piece keeps its MIDI only. Both come
with the `render` extra (verovio) and Debian's `fluidsynth` and `fluid-soundfont-gm` packages.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from typing import Mapping

from absl import logging
from etils import epath

from notagen_jax import storage
from notagen_jax.data import abc

SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/default-GM.sf2")
# Verovio's units: a page as wide as a browser window, scaled to 40% of its default size.
OPTIONS = {"scale": 40, "pageWidth": 2100, "adjustPageHeight": True, "footer": "none"}


class RenderError(ValueError):
  """Why a piece has no score: Verovio could not read it, found no notes, or is missing."""


@dataclasses.dataclass(frozen=True)
class Rendered:
  """One piece's pages (SVG texts) and files written; `error` says why there are no pages."""
  name: str
  pages: list[str]
  files: dict[str, str]
  error: str = ""


def _verovio():
  try:
    import verovio  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise RenderError("verovio is not installed (pip install 'notagen-jax[render]')") from error
  verovio.enableLog(verovio.LOG_OFF)  # it prints every odd element it skips
  return verovio


def svg_pages(data: str) -> list[str]:
  """The pages of a MusicXML text as SVG."""
  verovio = _verovio()
  toolkit = verovio.toolkit(False)
  # Verovio's default font path is set for the importing thread only; the demo renders in others.
  toolkit.setResourcePath(os.path.join(os.path.dirname(verovio.__file__), "data"))
  toolkit.setOptions(OPTIONS)
  if not data.strip() or not toolkit.loadData(data) or toolkit.getPageCount() == 0:
    raise RenderError("Verovio could not read it")
  pages = [toolkit.renderToSVG(page) for page in range(1, toolkit.getPageCount() + 1)]
  if not any('class="note"' in page for page in pages):
    raise RenderError("no notes to engrave")
  return pages


def score_source(files: Mapping[str, str]) -> str:
  """The MusicXML a piece's score is engraved from: as written, else converted from its
  un-reduced ABC as `generation` converts it. Verovio's own ABC reader does not follow the
  interleaved voices (`[V:1]...|[V:2]...|`): it strings them on one staff under an empty first key
  signature."""
  if "xml" in files:
    return storage.path(files["xml"]).read_text()
  if "unreduced" in files:
    try:
      return abc.to_musicxml(storage.path(files["unreduced"]).read_text())
    except abc.PieceError as error:
      raise RenderError(str(error)) from error
  raise RenderError("no MusicXML or un-reduced ABC was written")


def synthesizer() -> tuple[str, str] | None:
  """(fluidsynth binary, soundfont) where both are installed; None otherwise, logged once."""
  binary = shutil.which("fluidsynth")
  soundfont = next((s for s in SOUNDFONTS if epath.Path(s).exists()), None)
  if binary and soundfont:
    return binary, soundfont
  logging.log_first_n(logging.WARNING, "no audio: FluidSynth and a General MIDI soundfont are "
                      "not installed (Debian: fluidsynth fluid-soundfont-gm); MIDI only", 1)
  return None


def to_audio(midi: epath.PathLike, out: epath.PathLike, synth: tuple[str, str]) -> epath.Path:
  """Plays `midi` into `out` (Ogg Vorbis) with FluidSynth."""
  out = storage.path(out)
  binary, soundfont = synth
  # FluidSynth reads and writes only local files.
  with storage.local_copy(midi) as source, storage.local_output(out) as local:
    subprocess.run([binary, "-ni", "-q", "-T", "oga", "-r", "22050", "-F", str(local), soundfont,
                    str(source)], check=True, capture_output=True, timeout=300)
  return out


def render_piece(files: Mapping[str, str], out_dir: epath.PathLike, name: str,
                 audio: bool = True) -> Rendered:
  """`name.page<N>.svg` for each page and `name.ogg` (with a synthesizer) of a written piece.

  A piece that cannot be engraved has no pages and its `error`; its audio is still made.
  """
  out_dir = storage.path(out_dir)
  written: dict[str, str] = {}
  pages, error = [], ""
  try:
    pages = svg_pages(score_source(files))
  except RenderError as failure:
    error = str(failure)
  for number, page in enumerate(pages, 1):
    path = out_dir / f"{name}.page{number}.svg"
    path.write_text(page)
    written[f"page{number}"] = str(path)
  synth = synthesizer() if audio and "mid" in files else None
  if synth:
    try:
      written["audio"] = str(to_audio(files["mid"], out_dir / f"{name}.ogg", synth))
    except (subprocess.SubprocessError, OSError) as failure:
      logging.warning("%s: no audio: %s", name, failure)
  return Rendered(name, pages, written, error)
