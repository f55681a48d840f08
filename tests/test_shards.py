import json
import pathlib
import random
import sys

import numpy as np
import pytest

import notagen_reference as reference
from notagen_jax.data import abc
from notagen_jax.data import shards
from notagen_jax.data.tokenizer import choose_stream_start

PROMPT = "%Baroque\n%Bach, Johann Sebastian\n%Choral\n"


def key_field(text: str) -> str:
  return next(line[2:] for line in text.split("\n") if line.startswith("K:"))


def write_prepared(prepared: pathlib.Path, golden: pathlib.Path) -> list[dict]:
  """A PREPARED dir from the golden pieces: 6 train pieces (one without prompt), 1 eval piece."""
  pieces = []
  for i, case in enumerate(json.loads((golden / "prepare_cases.json").read_text())["cases"]):
    pieces.append({"piece_id": f"prep{i}", "source": case["source"], "split": "train",
                   "original_key": case["original_key"], "interleaved": case["interleaved"],
                   "augmented": case["augmented_rest_reduced"]})
  chorales = json.loads((golden / "cases.json").read_text())["cases"]
  for i, case in enumerate(chorales + chorales[:1]):
    # One text for every key: enough for shard and pipeline mechanics.
    pieces.append({"piece_id": f"chorale{i}", "source": case["source"],
                   "split": "eval" if i == len(chorales) else "train",
                   "original_key": key_field(case["input_text"]),
                   "interleaved": case["input_text"],
                   "augmented": {key: case["input_text"] for key in abc.KEYS}})
  for piece in pieces:
    unknown = piece["piece_id"] == "chorale2"
    piece.update(period="" if unknown else "Baroque",
                 composer="" if unknown else "Bach, Johann Sebastian",
                 instrumentation="" if unknown else "Choral", prompt="" if unknown else PROMPT)
    path = prepared / "pieces" / piece["split"] / f"{piece['piece_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(piece))
  return pieces


@pytest.fixture(scope="module")
def built(tmp_path_factory, golden_dir):
  root = tmp_path_factory.mktemp("shards")
  pieces = write_prepared(root / "prepared", golden_dir)
  return pieces, shards.build_shards(root / "prepared", root / "out")


def records(shards_dir, split):
  source = shards.open_split(shards_dir, split)
  return {source[i]["piece_id"].decode(): source[i] for i in range(len(source))}


def test_round_trip(built):
  pieces, shards_dir = built
  train, evals = records(shards_dir, "train"), records(shards_dir, "eval")
  assert sorted(train) == sorted(p["piece_id"] for p in pieces if p["split"] == "train")
  assert sorted(evals) == ["chorale3"]
  for piece in pieces:
    record = {**train, **evals}[piece["piece_id"]]
    assert record["original_key"].decode() == piece["original_key"]
    assert record["original_major_key"].decode() == abc.major_key(piece["original_key"])
    assert record["composer"].decode() == piece["composer"]
    n_prompt = int(record["n_prompt_patches"])
    # "%Bach, Johann Sebastian\n" takes two patches.
    assert n_prompt == (0 if not piece["prompt"] else 4)
    for k, key in enumerate(abc.KEYS):
      text = piece["prompt"] + piece["augmented"][key]
      ids, n_metadata, cut_points = shards.key_rows(record, k)
      assert ids.dtype == np.uint8
      assert ids.tolist() == reference.encode_train(text, 10**6)
      metadata_lines, body_lines = reference.training_lines(text)
      assert n_metadata == 1 + sum(len(reference.split_patches(line)) for line in metadata_lines)
      body = reference.tunebody_patches(body_lines) + [reference.EOS_PATCH]
      assert cut_points.tolist() == [0] + [i + 1 for i, patch in enumerate(body) if "\n" in patch]
      # Dropping the prompt rows gives exactly the encoding of the text without the prompt.
      dropped = np.concatenate([ids[:1], ids[1 + n_prompt:]])
      assert dropped.tolist() == reference.encode_train(piece["augmented"][key], 10**6)


def test_default_build_needs_neither_beam_nor_tensorflow(built):
  assert "apache_beam" not in sys.modules and "tensorflow" not in sys.modules


def test_stream_cut_on_ids_matches_reference(built):
  pieces, shards_dir = built
  train = records(shards_dir, "train")
  cuts = 0
  for patch_length in (32, 200):
    for piece in pieces[:3]:
      for k in (0, 7, 14):
        ids, n_metadata, cut_points = shards.key_rows(train[piece["piece_id"]], k)
        text = piece["prompt"] + piece["augmented"][abc.KEYS[k]]
        for seed in range(8):
          start = choose_stream_start(cut_points.tolist(), len(ids), patch_length,
                                      random.Random(seed))
          cut = np.concatenate([ids[:n_metadata], ids[n_metadata + start:]])[:patch_length]
          patches, kept_from = reference.encode_train_patches(text, patch_length,
                                                              random.Random(seed))
          assert cut.tolist() == reference.to_ids(patches)
          assert start == cut_points[kept_from]
          cuts += kept_from > 0
  assert cuts > 20  # the loop does exercise the cut, not only the head


def test_no_prompt_config(tmp_path, golden_dir):
  pieces = write_prepared(tmp_path / "prepared", golden_dir)
  shards_dir = shards.build_shards(tmp_path / "prepared", tmp_path / "out", with_prompt=False)
  assert shards_dir.parent.name == "p16_no_prompt"
  train = records(shards_dir, "train")
  piece = pieces[0]
  record = train[piece["piece_id"]]
  assert int(record["n_prompt_patches"]) == 0
  assert shards.key_rows(record, 1)[0].tolist() == reference.encode_train(
      piece["augmented"]["C"], 10**6)
