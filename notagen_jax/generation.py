"""Generation as users run it: prompts in, pieces out as ABC, un-reduced ABC, MusicXML and MIDI.

`sampling` draws the characters; this module builds and checks prompts, writes each piece as it
finishes (a conversion failure is recorded for that piece and the others go on), with its record
beside it, and gathers the records of a run into `pieces.jsonl`. With several processes
(`distributed`) each draws and writes its share of the pieces.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import time
from typing import Callable, Iterable, Sequence

from etils import epath

from notagen_jax import constraint
from notagen_jax import distributed
from notagen_jax import metrics
from notagen_jax import model as model_lib
from notagen_jax import sampling
from notagen_jax import storage
from notagen_jax.data import abc
from notagen_jax.data import corpus
from notagen_jax.data import tokenizer

Combination = tuple[str, str, str]


def known_combinations(prepared_dir: epath.PathLike) -> collections.Counter[Combination]:
  """The (period, composer, instrumentation) prompts of a prepared corpus (what it fine-tunes on),
  each with its number of pieces."""
  pieces = storage.path(prepared_dir) / "pieces"
  if not pieces.is_dir():
    raise FileNotFoundError(f"{prepared_dir}: not a prepared corpus (no pieces/ folder)")
  found = collections.Counter()
  for path in pieces.glob("*/*.json"):
    record = json.loads(path.read_text())
    if record.get("prompt"):
      found[tuple(record[field] for field in corpus.PROMPT_FIELDS)] += 1
  return found


def prompt_text(period: str, composer: str, instrumentation: str,
                known: Iterable[Combination] | None = None) -> str:
  """The three `%` conditioning lines; with `known`, an unknown combination names close matches."""
  combination = (period, composer, instrumentation)
  if not all(combination):
    raise ValueError("a prompt needs period, composer and instrumentation, got "
                     f"{combination!r}")
  if known is not None:
    known = sorted(known)
    if combination not in known:
      spelled = {"|".join(c): c for c in known}
      close = difflib.get_close_matches("|".join(combination), list(spelled), n=5, cutoff=0.4)
      hint = "; ".join(" / ".join(spelled[c]) for c in close) or "none close"
      raise ValueError(f"prompt {' / '.join(combination)!r} is not among the {len(known)} "
                       f"combinations the model was fine-tuned on; close matches: {hint}")
  return corpus.prompt_lines(dict(zip(corpus.PROMPT_FIELDS, combination)))


def continuation_prompt(path: epath.PathLike, head: str = "", bars: int = 0,
                        extra_lines: int | None = None, tune: int = 0) -> str:
  """A prompt continuing a score file: its first `bars` lines (0: all) in training form.

  The piece (MusicXML, ABC or Humdrum, as `prepare` reads them; an interleaved ABC such as a
  generated piece too) is converted, cleaned and rest-reduced as in preparation, with `head`
  (e.g. the `%` prompt lines) before its header. `tune` (1-based) picks one tune of an ABC file
  that holds several; such a file needs it. Its body lines get `[r:i/j]` markers whose j counts
  down to `extra_lines` more lines (default: as many again), so that the model does not read the
  prompt's last line as the piece's last.
  """
  sources = corpus.file_sources(path)
  if tune and not 1 <= tune <= len(sources):
    raise ValueError(f"{path}: no tune {tune} (it holds {len(sources)})")
  if not tune and len(sources) > 1:
    raise ValueError(f"{path} holds {len(sources)} tunes: choose one with --tune "
                     f"(1 to {len(sources)})")
  source = sources[tune - 1 if tune else 0]
  try:
    lines = tokenizer.text_lines(abc.rest_reduce(abc.clean(source.to_standard_abc())))
  except abc.PieceError as error:
    raise ValueError(f"{path}: cannot be used as a prompt: {error}") from error
  split = tokenizer.body_index(lines)
  metadata, body = lines[:split], lines[split:]
  if bars:
    body = body[:bars]
  total = len(body) + (len(body) if extra_lines is None else extra_lines)
  marked = [tokenizer.stream_marker(i, total) + line for i, line in enumerate(body)]
  return head + "".join(metadata) + "".join(marked)


# The header line each fixed field of a `constraint.Header` writes.
HEADER_TAGS = {"meter": "M:", "key": "K:", "unit": "L:", "tempo": "Q:"}


def header_conflicts(prompt: str, header: constraint.Header) -> list[tuple[str, str]]:
  """The fixed fields a prompt's complete header disagrees with: (field, what it writes instead).

  A prompt that reaches the body (a continuation) has its header already written, so a field
  fixed otherwise cannot be; one that does not leaves the header to the constraint.
  """
  lines = [line.rstrip("\n") for line in tokenizer.text_lines(prompt)]
  split = tokenizer.body_index(lines)
  if split < 0:
    return []
  metadata = lines[:split]
  conflicts = []
  for field, tag in HEADER_TAGS.items():
    wanted = getattr(header, field)
    written = [line for line in metadata if line.startswith(tag)]
    if wanted is not None and [line[len(tag):].strip() for line in written] != [wanted]:
      conflicts.append((field, " ".join(written) or f"no {tag} line"))
  voices = sum(line.startswith("V:") for line in metadata)
  if header.voices is not None and voices != header.voices:
    conflicts.append(("voices", f"{voices} voice" + "s" * (voices != 1)))
  return conflicts


@dataclasses.dataclass(frozen=True)
class Written:
  """What was written for one piece; `errors` maps a failed output to its reason, `metrics`
  holds what `summary` sums up of it."""
  index: int
  name: str
  ok: bool
  reason: str
  patches: int
  chars: int
  seconds: float
  files: dict[str, str]
  errors: dict[str, str]
  metrics: metrics.PieceMetrics = metrics.PieceMetrics()


def readable(text: str) -> str:
  """The original's output form: un-reduced, `%` prompt lines dropped, `X:1` first."""
  lines = tokenizer.text_lines(abc.unreduce(text))
  lines = [line for line in lines if not (line.startswith("%") and not line.startswith("%%"))]
  return "".join(["X:1\n"] + lines)


def write_piece(result: sampling.Result, out_dir: epath.PathLike, name: str,
                formats: Sequence[str] = ("xml", "mid")) -> Written:
  """`name.abc` (raw), `name.unreduced.abc`, and `formats` of one piece; failures are recorded."""
  out_dir = storage.path(out_dir)
  files = {"abc": out_dir / f"{name}.abc"}
  files["abc"].write_text(result.text)
  errors: dict[str, str] = {}
  musicxml = None
  try:
    unreduced = readable(result.text)
    files["unreduced"] = out_dir / f"{name}.unreduced.abc"
    files["unreduced"].write_text(unreduced)
    if "xml" in formats or "mid" in formats:
      musicxml = abc.to_musicxml(unreduced)
      files["xml"] = out_dir / f"{name}.xml"
      files["xml"].write_text(musicxml)
  except abc.PieceError as error:
    errors["xml" if "unreduced" in files else "unreduced"] = str(error)
  if musicxml is not None and "mid" in formats:
    try:
      files["mid"] = _write_midi(musicxml, out_dir / f"{name}.mid")
    except Exception as error:  # music21 raises many kinds on odd scores; the piece is kept
      errors["mid"] = f"{type(error).__name__}: {error}"
  if "xml" not in formats:
    files.pop("xml", None)
  return Written(result.index, name, result.ok, result.reason, result.patches, len(result.text),
                 round(result.seconds, 2), {k: str(v) for k, v in files.items()}, errors,
                 metrics.piece_metrics(result.text))


def _write_midi(musicxml: str, path: epath.Path) -> epath.Path:
  import music21  # pylint: disable=import-outside-toplevel
  score = music21.converter.parse(musicxml, format="musicxml")
  with storage.local_output(path) as local:  # music21 writes only local files
    try:
      score.write("midi", fp=str(local))
    except music21.repeat.ExpanderException:
      # music21 unrolls repeats for MIDI and refuses those it cannot pair (a piece stopped
      # inside a repeat, a voice abc2xml gave one barline less): they play as written.
      _drop_repeats(score)
      score.write("midi", fp=str(local))
  return path


def _drop_repeats(score) -> None:
  """Plain barlines for repeat barlines, and no segno, coda or da capo marks."""
  import music21  # pylint: disable=import-outside-toplevel
  for measure in score.recurse().getElementsByClass(music21.stream.Measure):
    for side in ("leftBarline", "rightBarline"):
      barline = getattr(measure, side)
      if isinstance(barline, music21.bar.Repeat):
        setattr(measure, side, music21.bar.Barline(barline.type))
  for mark in list(score.recurse().getElementsByClass(music21.repeat.RepeatExpression)):
    mark.activeSite.remove(mark)


def record_path(out_dir: epath.PathLike, index: int) -> epath.Path:
  """Where piece `index`'s record (`Written`) is kept; written last, once its files are."""
  return storage.path(out_dir) / f"{piece_name(index)}.json"


def piece_name(index: int) -> str:
  return f"piece_{index:05d}"


def read_record(path: epath.PathLike) -> Written:
  record = json.loads(storage.path(path).read_text())
  return Written(**{**record, "metrics": metrics.PieceMetrics(**record["metrics"])})


def generate(model: model_lib.NotaGen, prompts: Sequence[str], out_dir: epath.PathLike, *,
             settings: sampling.Settings = sampling.Settings(), batch: int = 8, seed: int = 0,
             formats: Sequence[str] = ("xml", "mid"), progress: bool = True,
             weights_dtype: str | None = None, perplexity: bool = False,
             header: constraint.Header | None = None, resume: bool = False,
             on_patches: Callable[[list[sampling.Piece]], None] | None = None
             ) -> list[Written]:
  """Generates one piece per prompt into out_dir; `pieces.jsonl` gets a line per piece.

  Piece i draws from fold_in(key(seed), i) wherever it is drawn: with several processes each
  draws its share (`distributed.share`) over its local devices and writes those pieces and their
  records; every process returns every piece once all are done, and process 0 writes
  pieces.jsonl. With `resume`, a piece whose record exists is not drawn again (an interrupted run,
  on any number of processes, goes on); otherwise every piece is drawn and written anew.
  `header` fixes those header lines of every piece (constrained sampling only; a prompt's own
  header must agree, see `header_conflicts`).
  `weights_dtype` ("bfloat16" or "int8") stores the weight matrices narrower for sampling (sums
  stay in float32; see `sampling.Sampler`): each character reads them all. `perplexity` adds each
  piece's log-likelihood under `model` itself (its own weights, not the narrower ones, and no
  constraint on decoding; one forward pass per piece), from which `summary` reports perplexity.
  `on_patches` sees the pieces being generated after each of the sampler's calls (its progress).
  """
  out = storage.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  mine = distributed.share(len(prompts))
  if resume:
    mine = [i for i in mine if not record_path(out, i).exists()]
  chars, start = 0, time.perf_counter()
  bar = _progress(len(mine)) if progress and mine else None

  def on_result(result: sampling.Result):
    nonlocal chars
    item = write_piece(result, out, piece_name(result.index), formats)
    if perplexity:
      likelihood = metrics.log_likelihood(model, result.text)
      item = dataclasses.replace(item, metrics=dataclasses.replace(item.metrics, **likelihood))
    record_path(out, item.index).write_text(json.dumps(dataclasses.asdict(item)))
    if bar is not None:
      chars += item.chars
      bar.set_postfix(chars_per_s=f"{chars / (time.perf_counter() - start):.0f}")
      bar.update(1)

  try:
    if mine:
      sampler = sampling.Sampler(model, settings, batch=batch, dtype=weights_dtype)
      sampler.run([prompts[i] for i in mine], seed=seed, on_result=on_result, header=header,
                  indices=mine, on_patches=on_patches)
  finally:
    if bar is not None:
      bar.close()
  distributed.barrier(f"notagen_jax:generated:{out}")
  written = [read_record(record_path(out, i)) for i in range(len(prompts))]
  if distributed.is_lead():
    (out / "pieces.jsonl").write_text("".join(json.dumps(dataclasses.asdict(w)) + "\n"
                                              for w in written))
  return written


def _progress(total: int):
  import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm.tqdm(total=total, desc="pieces", unit="piece")


def summary(written: Sequence[Written]) -> dict[str, float | int | None]:
  """Counts for a run: pieces, complete ones, shares un-reduced and converted to MusicXML / MIDI,
  chars, and `metrics.summarize`'s measures (bar alignment, filters, perplexity)."""
  n = max(len(written), 1)
  return {
      "pieces": len(written),
      "complete": sum(w.ok for w in written),
      "unreduced_share": round(sum("unreduced" in w.files for w in written) / n, 3),
      "musicxml_share": round(sum("xml" in w.files for w in written) / n, 3),
      "midi_share": round(sum("mid" in w.files for w in written) / n, 3),
      "chars": sum(w.chars for w in written),
      **metrics.summarize([w.metrics for w in written]),
  }
