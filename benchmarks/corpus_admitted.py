"""How much of music21's corpus the constraint admits: each prepared piece's training form read by
the automaton.

  python benchmarks/corpus_admitted.py [--stride=5] [--work=runs/corpus_admitted] [--workers=0]

Prepares every `--stride`-th source of music21's corpus as `prepare` does (into `--work`, reused
when it is there), puts each piece in its training form (prompt lines, header, body lines with
their stream markers; in C, one of the 15 keys the shards hold) and reads them all with
`constraint.first_rejections`. Prints the pieces admitted whole and, for each rejected one, the
text before its first rejected character and that character, and whether the body line it falls
in has voices whose bars differ in length as abctoolkit times them (a misalignment in the source
itself).
"""

import argparse
import json
import pathlib

import machine

from notagen_jax import constraint
from notagen_jax.data import abc
from notagen_jax.data import corpus
from notagen_jax.data import preparation
from notagen_jax.data import tokenizer


def source_misaligned(line: str) -> bool:
  """Whether a body line's voices have bars of different lengths (abctoolkit's reading)."""
  if not line.startswith("[r:"):
    return False
  try:
    bars = abc.voice_bars(line[line.index("]") + 1:], 0)
    durations = {abc.bar_duration(abc.split_barlines(bar, False)[1]) for bar in bars.values()}
  except abc.PieceError:
    return False
  return len(durations) > 1


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--stride", type=int, default=5)
  parser.add_argument("--work", default="runs/corpus_admitted")
  parser.add_argument("--workers", type=int, default=0, help="0: all cores")
  args = parser.parse_args()
  machine.print_header()
  work = pathlib.Path(args.work)
  every_source = list(corpus.music21_sources())
  sources = every_source[::args.stride]
  if not (work / "pieces").exists():
    preparation.prepare_corpus(sources, work, preparation.PrepareOptions(
        eval_fraction=0.0, workers=args.workers))
  records = [json.loads(path.read_text()) for path in sorted(work.glob("pieces/*/*.json"))]
  patchilizer = tokenizer.Patchilizer(patch_length=1_000_000)
  texts, pieces = [], []
  for record in records:
    prompt = record["prompt"] if record["prompt"].endswith("\n") else record["prompt"] + "\n"
    texts.append(prompt + record["augmented"]["C"])
    pieces.append(patchilizer.encode_train(texts[-1]))
  rejections = constraint.first_rejections(pieces)
  misaligned = 0
  for record, piece, at in zip(records, pieces, rejections):
    if at is None:
      continue
    chars, _ = constraint.patch_chars(piece[1:])
    text = "".join(chr(c) if c > tokenizer.EOS else "" for c in chars[:at])
    line = (text[text.rfind("\n") + 1:] + chr(chars[at])
            + "".join(chr(c) for c in chars[at + 1:at + 200])).split("\n")[0]
    source = source_misaligned(line)
    misaligned += source
    print(f"{record['piece_id']}: {text[-60:]!r} then {chr(chars[at])!r}"
          + ("  (voices misaligned in the source)" if source else ""))
  admitted = sum(at is None for at in rejections)
  print(f"{admitted:,} of {len(records):,} pieces admitted whole ({admitted / len(records):.1%}); "
        f"{misaligned} of the {len(records) - admitted} rejected are misaligned in the source "
        f"(every {args.stride}th of {len(every_source):,} sources)")


if __name__ == "__main__":
  main()
