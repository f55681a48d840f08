"""What constrained decoding changes in the pieces: the same model sampled with and without it.

  python benchmarks/well_formed.py (--checkpoint=PATH | --random=256,1,1,64) [--pieces=64]
      [--max_patches=200] [--batch=16] [--period=Baroque --composer='Bach, Johann Sebastian'
      --instrumentation=Choral]

Generates `--pieces` pieces from one prompt twice, unconstrained (the original's sampling) and
constrained (`sampling.Settings(constrained=True)`), with the same seed, settings (top-k 9, top-p
0.9, temperature 1.2) and guard (`--max_patches` per piece), and prints one row per mode: the
shares of pieces that un-reduce and convert to MusicXML and MIDI, the bar-alignment error, the
share passing the original's alignment and grouping filters, and the samples' perplexity under
the model without the constraint (what the constraint costs in likelihood). `--random` takes a
randomly initialized model of (patch_length, patch layers, char layers, hidden): the hardest case.
"""

import argparse
import tempfile

import machine

from notagen_jax import checkpoint
from notagen_jax import generation
from notagen_jax import model as model_lib
from notagen_jax import sampling

COLUMNS = ("unreduced_share", "musicxml_share", "midi_share", "bar_alignment_error",
           "aligned_share", "grouped_share", "perplexity", "chars")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="a checkpoint directory, or a NotaGen .pth")
  source.add_argument("--random", help="patch_length,patch_layers,char_layers,hidden")
  parser.add_argument("--pieces", type=int, default=64)
  parser.add_argument("--max_patches", type=int, default=200)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--period", default="Baroque")
  parser.add_argument("--composer", default="Bach, Johann Sebastian")
  parser.add_argument("--instrumentation", default="Choral")
  args = parser.parse_args()
  machine.print_header()
  if args.checkpoint:
    model = checkpoint.load_model(args.checkpoint)
  else:
    size = tuple(int(x) for x in args.random.split(","))
    model = model_lib.create(model_lib.config_for(size))
  prompt = generation.prompt_text(args.period, args.composer, args.instrumentation)
  print(f"{args.pieces} pieces of at most {args.max_patches} patches, prompt "
        f"{prompt.strip().splitlines()}, seed {args.seed}")
  print("mode".ljust(14) + "".join(name.rjust(21) for name in COLUMNS))
  for constrained in (False, True):
    settings = sampling.Settings(constrained=constrained, max_patches=args.max_patches)
    with tempfile.TemporaryDirectory() as out:
      written = generation.generate(model, [prompt] * args.pieces, out, settings=settings,
                                    batch=args.batch, seed=args.seed, progress=False,
                                    perplexity=True)
    summary = generation.summary(written)
    cells = ["-" if summary[name] is None else str(summary[name]) for name in COLUMNS]
    print(("constrained" if constrained else "unconstrained").ljust(14) +
          "".join(cell.rjust(21) for cell in cells), flush=True)
    if constrained:  # (unconstrained pieces fail in every way; constrained ones should not)
      for w in written:
        if w.errors or not w.ok:
          print(f"#   piece {w.index} ({w.patches} patches): {w.reason or 'complete'}; "
                f"{w.errors}", flush=True)


if __name__ == "__main__":
  main()
