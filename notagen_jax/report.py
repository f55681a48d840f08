"""HTML pages to judge a run by: `index.html` of `generate`, `report.html` of the CLaMP-DPO loop.

Each page opens from the file system with no network: its style and plot are inline, the score
pages are the SVG files `render` wrote beside the pieces, shown as images loaded as they scroll
into view (inline, a CLaMP-DPO report of 114 pieces weighed 24.7 MB), and every file is a
relative link.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import urllib.parse
from typing import Any, Mapping, Sequence

from etils import epath

from notagen_jax import generation
from notagen_jax import render
from notagen_jax import storage
from notagen_jax.data import abc
from notagen_jax.scoring import preferences

LABELS = {"abc": "ABC (as generated)", "unreduced": "ABC", "xml": "MusicXML", "mid": "MIDI",
          "audio": "audio (Ogg)"}
STEPS = {"unreduced": "un-reduced ABC", "xml": "MusicXML", "mid": "MIDI"}
STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; display: block; overflow-x: auto; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f2f2f2; }
section.piece { border-top: 2px solid #ddd; padding: 0.5em 0; }
section.failed h3 { color: #b00; }
.reason { color: #b00; }
.page img { max-width: 100%; height: auto; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
"""


@dataclasses.dataclass(frozen=True)
class Piece:
  """What a page shows of one piece; `pages` (its SVG files) and `links` are paths relative to
  the page."""
  name: str
  pages: list[str]
  links: dict[str, str]
  facts: dict[str, str]
  failures: list[str]
  prompt: str = ""


def _e(value: Any) -> str:
  return html.escape(str(value))


def document(title: str, body: str) -> str:
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>{_e(title)}'
          f"</title>\n<style>{STYLE}</style></head>\n<body>\n<h1>{_e(title)}</h1>\n{body}\n"
          "</body></html>\n")


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  head = "".join(f"<th>{_e(c)}</th>" for c in columns)
  body = "".join("<tr>" + "".join(f"<td>{_e('-' if v is None else v)}</td>" for v in row)
                 + "</tr>\n" for row in rows)
  return f"<table><tr>{head}</tr>\n{body}</table>"


def piece_html(piece: Piece) -> str:
  """A piece's section: heading, facts, failures, links, player and score pages."""
  parts = [f'<section class="piece{" failed" if piece.failures else ""}" '
           f'id="{_e(piece.name)}">', f"<h3>{_e(piece.name)}</h3>"]
  if piece.facts:
    parts.append("<p>" + " &middot; ".join(f"{_e(k)}: {_e(v)}" for k, v in piece.facts.items())
                 + "</p>")
  parts += [f'<p class="reason">{_e(reason)}</p>' for reason in piece.failures]
  if piece.prompt:
    parts.append(f"<details><summary>prompt</summary><pre>{_e(piece.prompt)}</pre></details>")
  parts.append('<p class="links">' + " | ".join(
      f'<a href="{_e(urllib.parse.quote(path))}">{_e(label)}</a>'
      for label, path in piece.links.items()) + "</p>")
  if "audio (Ogg)" in piece.links:
    parts.append(f'<audio controls preload="none" '
                 f'src="{_e(urllib.parse.quote(piece.links["audio (Ogg)"]))}"></audio>')
  parts += [f'<div class="page"><img src="{_e(urllib.parse.quote(page))}" loading="lazy" '
            f'alt="{_e(piece.name)}, page {number}"></div>'
            for number, page in enumerate(piece.pages, 1)]
  parts.append("</section>")
  return "\n".join(parts)


def failures_html(pieces: Sequence[Piece]) -> str:
  failed = [p for p in pieces if p.failures]
  if not failed:
    return "<h2>Failures</h2><p>none</p>"
  items = "".join(f'<li><a href="#{_e(p.name)}">{_e(p.name)}</a>: '
                  f'<span class="reason">{_e("; ".join(p.failures))}</span></li>\n'
                  for p in failed)
  return f'<h2>Failures</h2><ul class="failures">\n{items}</ul>'


def index_html(title: str, settings: Mapping[str, Any], pieces: Sequence[Piece]) -> str:
  """A run's page: its settings, the failures with their reasons, then every piece."""
  body = [f"<p>{len(pieces)} pieces, {sum(not p.failures for p in pieces)} without failure.</p>",
          "<h2>Settings</h2>", table(["setting", "value"], sorted(settings.items())),
          failures_html(pieces), "<h2>Pieces</h2>", *map(piece_html, pieces)]
  return document(title, "\n".join(body))


def _relative(path: str, root: epath.Path) -> str:
  return os.path.relpath(str(path), str(root)).replace(os.sep, "/")


def _pages(rendered: render.Rendered, root: epath.Path) -> list[str]:
  return [_relative(rendered.files[f"page{n}"], root) for n in range(1, len(rendered.pages) + 1)]


def _links(files: Mapping[str, str], root: epath.Path) -> dict[str, str]:
  links = {LABELS[k]: _relative(v, root) for k, v in files.items() if k in LABELS}
  links.update({f"SVG {k}": _relative(v, root) for k, v in files.items() if k.startswith("page")})
  return links


def written_piece(item: generation.Written, root: epath.Path, prompt: str = "") -> Piece:
  """A generated piece rendered beside its files, with every failure of the way there."""
  rendered = render.render_piece(item.files, storage.path(item.files["abc"]).parent, item.name)
  failures = [] if item.ok else [f"generation: {item.reason}"]
  failures += [f"{STEPS.get(k, k)}: {v}" for k, v in item.errors.items()]
  if rendered.error and not {"unreduced", "xml"} & item.errors.keys():  # those say why already
    failures.append(f"score: {rendered.error}")
  facts = {"status": "complete" if item.ok else "failed", "patches": item.patches,
           "chars": item.chars, "seconds": item.seconds, "pages": len(rendered.pages)}
  return Piece(item.name, _pages(rendered, root), _links({**item.files, **rendered.files}, root),
               {k: str(v) for k, v in facts.items()}, failures, prompt)


def write_index(out_dir: epath.PathLike, written: Sequence[generation.Written],
                prompts: Sequence[str], settings: Mapping[str, Any]) -> epath.Path:
  """OUT/index.html for a `generate` run; `prompts[i]` is piece i's prompt."""
  out = storage.path(out_dir)
  pieces = [written_piece(item, out, prompts[item.index]) for item in written]
  path = out / "index.html"
  path.write_text(index_html(f"Generated pieces: {out.name}", settings, pieces))
  return path


def mean_and_error(scores: Sequence[float | None]) -> tuple[float, float] | None:
  """Mean and standard error of the scored pieces (None when none was scored)."""
  values = [s for s in scores if s is not None and math.isfinite(s)]
  if not values:
    return None
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, 0.0
  variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
  return mean, math.sqrt(variance / len(values))


def score_plot(points: Sequence[tuple[int, float, float]], label: str) -> str:
  """An inline SVG line plot of (iteration, mean, error) with error bars."""
  width, height, left, bottom, pad = 520, 280, 70, 40, 20
  lows = [m - e for _, m, e in points] or [0.0]
  highs = [m + e for _, m, e in points] or [1.0]
  low, high = min(lows), max(highs)
  low, high = (low - 0.05, high + 0.05) if high - low < 1e-6 else (low, high)
  first, last = min((p[0] for p in points), default=0), max((p[0] for p in points), default=1)
  span = max(last - first, 1)

  def x(k):  # inset so that the end points' error bars clear the axis
    return left + pad + (width - left - 3 * pad) * (0.5 if first == last else (k - first) / span)

  def y(v):
    return height - bottom - (height - bottom - pad) * (v - low) / (high - low)

  parts = [f'<svg class="plot" width="{width}" height="{height}" '
           f'xmlns="http://www.w3.org/2000/svg" font-size="12">',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - pad}" y2="{height - bottom}" '
           'stroke="#444"/>',
           f'<line x1="{left}" y1="{pad}" x2="{left}" y2="{height - bottom}" stroke="#444"/>']
  for v in (low, (low + high) / 2, high):
    parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
  for k, mean, error in points:
    parts += [f'<text x="{x(k):.1f}" y="{height - bottom + 16}" text-anchor="middle">{k}</text>',
              f'<line class="error" x1="{x(k):.1f}" y1="{y(mean - error):.1f}" x2="{x(k):.1f}" '
              f'y2="{y(mean + error):.1f}" stroke="#1f77b4"/>',
              f'<circle cx="{x(k):.1f}" cy="{y(mean):.1f}" r="4" fill="#1f77b4"/>']
  if len(points) > 1:
    line = " ".join(f"{x(k):.1f},{y(m):.1f}" for k, m, _ in points)
    parts.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4"/>')
  parts += [f'<text x="{(left + width) / 2}" y="{height - 6}" text-anchor="middle">'
            "CLaMP-DPO iteration (policy trained k times)</text>",
            f'<text x="14" y="{(height - bottom) / 2}" text-anchor="middle" '
            f'transform="rotate(-90 14 {(height - bottom) / 2})">{_e(label)}</text>', "</svg>"]
  return "\n".join(parts)


def verdicts(scores: Mapping[str, Any], i: int, text: str, chosen: bool,
             applied: Sequence[str]) -> dict[str, bool | None]:
  """Piece i's verdict from each chosen-set filter, as the loop's `scores.json` records them.

  A `scores.json` written before the loop recorded them has none: `aligned` and `grouped` are read
  off the text again, and `original` (no ground-truth piece too close) is known only where a
  chosen piece had to pass it; None where unknown.
  """
  if "verdicts" in scores:
    return {name: ok[i] for name, ok in scores["verdicts"].items()}
  try:
    aligned = preferences.bars_aligned(abc.unreduce(text))
  except abc.PieceError:
    aligned = False
  return {"aligned": aligned, "grouped": preferences.instruments_grouped(text),
          "original": True if chosen and "original" in applied else None}


def filter_results(results: Mapping[str, bool | None], applied: Sequence[str]) -> dict[str, str]:
  """Each filter's verdict as shown: passed / failed / not recorded, marked where not applied."""
  shown = {}
  for name in preferences.FILTERS:
    ok = results.get(name)
    verdict = "not recorded" if ok is None else "passed" if ok else "failed"
    shown[name] = (verdict if name in applied else "not applied" if ok is None
                   else f"{verdict} (not applied)")
  return shown


def sampled_piece(k: int, i: int, samples: Mapping[str, Any], scores: Mapping[str, Any],
                  root: epath.Path, chosen: bool, applied: Sequence[str]) -> Piece:
  """Piece i of iteration k, chosen or rejected, rendered from the files `generate` wrote."""
  path = storage.path(samples["pieces"][i]["abc"])
  name = path.name.removesuffix(".abc")
  files = {"abc": str(path)}
  for kind, suffix in (("unreduced", ".unreduced.abc"), ("xml", ".xml"), ("mid", ".mid")):
    if (path.parent / f"{name}{suffix}").exists():
      files[kind] = str(path.parent / f"{name}{suffix}")
  rendered = render.render_piece(files, path.parent, name, audio=False)
  score = scores["scores"][i]
  results = verdicts(scores, i, path.read_text(), chosen, applied)
  facts = {"score": "-" if score is None else f"{score:.4f}", **filter_results(results, applied)}
  failures = [f"score: {rendered.error}"] if rendered.error else []
  return Piece(f"iteration_{k}/{name}", _pages(rendered, root),
               _links({**files, **rendered.files}, root), facts, failures)


def iteration_html(k: int, workdir: epath.Path, applied: Sequence[str]) -> str:
  """One iteration's chosen and rejected pieces side by side (best and worst first)."""
  out = workdir / f"iteration_{k}"
  samples = json.loads((out / "samples" / "samples.json").read_text())
  scores = json.loads((out / "scores.json").read_text())
  columns = []
  for kind in ("chosen", "rejected"):
    pieces = [sampled_piece(k, i, samples, scores, workdir, kind == "chosen", applied)
              for i in scores[kind]]
    columns.append(f'<div class="{kind}"><h3>{kind} ({len(pieces)})</h3>\n'
                   + "\n".join(map(piece_html, pieces)) + "</div>")
  return (f'<h2 id="iteration_{k}">Iteration {k}</h2>\n<div class="pair">\n' + "\n".join(columns)
          + "\n</div>")


def write_dpo_report(workdir: epath.PathLike, rows: Sequence[Mapping[str, Any]],
                     columns: Sequence[str], scorer: str, applied: Sequence[str],
                     prompt_rows: Sequence[Mapping[str, Any]] = (),
                     prompt_columns: Sequence[str] = ()) -> epath.Path:
  """WORKDIR/report.html: the summary table, the score plot, each iteration's pairs; with several
  prompts, their rows (`prompt_columns` of `prompt_rows`) after the summary."""
  workdir = storage.path(workdir)
  points, sections = [], []
  for r in rows:
    k = r["iteration"]
    scores = json.loads((workdir / f"iteration_{k}" / "scores.json").read_text())
    stats = mean_and_error(scores["scores"])
    if stats:
      points.append((k, *stats))
    sections.append(iteration_html(k, workdir, applied))
  body = ["<h2>Iterations</h2>", table(columns, [[r[c] for c in columns] for r in rows])]
  if prompt_rows:
    body += ["<h2>Per prompt</h2>",
             table(prompt_columns, [[r[c] for c in prompt_columns] for r in prompt_rows])]
  body += ["<h2>Score</h2>", score_plot(points, f"mean score ({scorer}) ± standard error"),
           f"<p>Chosen-set filters applied: {_e(', '.join(applied) or 'none')}.</p>", *sections]
  path = workdir / "report.html"
  path.write_text(document(f"CLaMP-DPO: {workdir.name}", "\n".join(body)))
  return path
