"""`python -m notagen_jax.tokenize FILE.abc`: prints NotaGen's patch ids as JSON.

--mode=train: the training encoding (stream markers added; with --seed, the original's random
stream cut for pieces longer than --patch_length, else the head). --mode=generate: the encoding
of a prompt to continue. FILE may be local or a gs:// URL.
"""

import json
import random

from absl import app
from absl import flags

from notagen_jax import cli
from notagen_jax import storage
from notagen_jax.data.tokenizer import Patchilizer

_PATCH_LENGTH = flags.DEFINE_integer("patch_length", 2048, "Patches per sequence.")
_PATCH_SIZE = flags.DEFINE_integer("patch_size", 16, "Characters per patch.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "generate"], "Which encoding.")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the stream cut (train mode).")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m notagen_jax.tokenize FILE.abc [flags]")
  path = storage.path(argv[1])
  if not path.is_file():
    raise app.UsageError(f"{path} is not a file")
  with cli.reported(argv[1]):
    text = path.read_text(encoding="utf-8")
  patchilizer = Patchilizer(patch_size=_PATCH_SIZE.value, patch_length=_PATCH_LENGTH.value)
  try:
    if _MODE.value == "train":
      rng = None if _SEED.value is None else random.Random(_SEED.value)
      ids = patchilizer.encode_train(text, rng=rng)
    else:
      ids = patchilizer.encode_generate(text)
  except ValueError as error:
    raise app.UsageError(f"{path}: {error}") from error
  print(json.dumps(ids))


if __name__ == "__main__":
  cli.run(main)
