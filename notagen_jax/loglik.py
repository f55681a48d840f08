"""Log-likelihood of scores under a NotaGen checkpoint, one JSON line per piece.

  python -m notagen_jax.loglik --checkpoint=PATH [--weights_dtype=int8] [--output=OUT] FILE...

Each file (MusicXML, ABC or Humdrum; an ABC file of several tunes gives a line per tune, its
"file" ending in #N) is read as `prepare` reads it and scored in the interleaved form `prepare`
writes (an interleaved ABC, e.g. from prepare's interleaved/, comes back the same): tokenized
with the training encoding (stream markers, head cut to patch_length) and scored on every real
target character: n_chars, mean_nll (nats per char) and sum_logprob. A file that cannot be read
is reported on stderr, one line each, and the others are scored; the exit status is 1 only when
none is. --weights_dtype scores the weights as sampling with that dtype stores them
(`sampling.as_stored`), which shows what bfloat16 or int8 sampling costs in likelihood. The lines
are printed, and with --output also written to OUT. Every path may be local or a gs:// URL.
"""

from __future__ import annotations

import argparse
import json
import sys

from notagen_jax import checkpoint
from notagen_jax import cli
from notagen_jax import metrics
from notagen_jax import sampling
from notagen_jax import storage
from notagen_jax.data import abc
from notagen_jax.data import corpus
from notagen_jax.data import tokenizer

def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m notagen_jax.loglik", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True,
                      help="a checkpoint directory, or a NotaGen .pth / .safetensors")
  parser.add_argument("--weights_dtype", choices=sampling.WEIGHT_DTYPES,
                      help="score the weights as sampling stores them in this dtype")
  parser.add_argument("--output", help="a file that gets the JSON lines too")
  parser.add_argument("files", nargs="+")
  args = parser.parse_args(argv)
  with cli.reported(args.checkpoint, errors=(Exception,)):
    model = checkpoint.load_model(args.checkpoint)
  if args.weights_dtype:
    model = sampling.as_stored(model, args.weights_dtype)
  patchilizer = tokenizer.Patchilizer(patch_size=model.cfg.patch_size,
                                      patch_length=model.cfg.patch_length)
  lines = []
  for path in args.files:
    try:
      sources = corpus.file_sources(path)
    except (ValueError, OSError) as error:
      _not_scored(path, error)
      continue
    for source in sources:
      name = path if len(sources) == 1 else f"{path}#{source.tune}"
      try:
        text = abc.interleave(abc.clean(source.to_standard_abc()))  # as prepare writes it
      except (ValueError, OSError) as error:  # abc.PieceError is a ValueError
        _not_scored(name, error)
        continue
      scored = metrics.score_ids(model, patchilizer.encode_train(text))
      lines.append(json.dumps({"file": name, **scored}))
      print(lines[-1], flush=True)
  if args.output:
    storage.path(args.output).write_text("".join(line + "\n" for line in lines))
  if not lines:
    cli.fail("nothing scored: no file could be read")


def _not_scored(name: str, error: Exception) -> None:
  reason = str(error).removeprefix(f"{name}: ")
  print(f"{cli.verb()}: {name}: not scored: {reason}", file=sys.stderr, flush=True)


if __name__ == "__main__":
  cli.run_argparse(main)
