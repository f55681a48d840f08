import json
import random

import pytest

from notagen_jax.data import tokenizer
from notagen_jax.data.tokenizer import Patchilizer


@pytest.fixture(scope="module")
def cases(golden_dir):
  return json.loads((golden_dir / "cases.json").read_text())["cases"]


def test_golden_patch_ids(cases):
  patchilizer = Patchilizer(patch_length=256)
  for case in cases:
    assert patchilizer.encode_train(case["input_text"]) == case["patch_ids"], case["name"]
    assert patchilizer.encode_train(case["input_text"], rng=random.Random(0)) == case["patch_ids"]


def test_decode_gives_stream_text(cases):
  patchilizer = Patchilizer(patch_length=256)
  for case in cases:
    decoded = patchilizer.decode(case["patch_ids"])
    # The bos patch decodes to fifteen chr(1), the eos patch to one.
    assert decoded == chr(1) * 15 + case["stream_text"] + chr(1)
