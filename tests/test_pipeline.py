import itertools
import json
import random

import numpy as np
import pytest

import notagen_reference as reference
from notagen_jax.data import abc
from notagen_jax.data import pipeline
from notagen_jax.data import shards
from notagen_jax.data.tokenizer import Patchilizer
from test_shards import write_prepared

SMALL = dict(batch_size=2, patch_length=32, shard_index=0, shard_count=1, num_threads=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory, golden_dir):
  root = tmp_path_factory.mktemp("pipeline")
  pieces = write_prepared(root / "prepared", golden_dir)
  return pieces, shards.build_shards(root / "prepared", root / "out")


@pytest.fixture(scope="module")
def shards_dir(built):
  return built[1]


@pytest.fixture(scope="module")
def train_records(shards_dir):
  source = shards.open_split(shards_dir, "train")
  return [source[i] for i in range(len(source))]


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_nearby_key_table():
  probs = dict(zip(abc.KEYS, pipeline.key_probs("nearby", "C")))
  expected = {"A": 1, "Bb": 2, "B": 3 * 0.8, "Cb": 3 * 0.2, "C": 4, "Db": 3 * 0.8, "C#": 3 * 0.2,
              "D": 2, "Eb": 1}
  for key in abc.KEYS:
    assert probs[key] == pytest.approx(expected.get(key, 0) / 16), key
  probs = dict(zip(abc.KEYS, pipeline.key_probs("nearby", "Eb")))
  assert probs["F#"] == pytest.approx(1 / 16 * 0.5) and probs["Gb"] == probs["F#"]
  for key in abc.KEYS:
    assert pipeline.key_probs("nearby", key).sum() == pytest.approx(1)
  np.testing.assert_allclose(pipeline.key_probs("uniform", "F"), 1 / 15)
  assert pipeline.key_probs("original", "Ab")[abc.KEYS.index("Ab")] == 1


def chi_squared_is_plausible(counts: np.ndarray, probs: np.ndarray, alpha: float = 1e-3) -> bool:
  """Pearson's test of counts against probs at level alpha (probability-0 keys must not occur)."""
  keep = probs > 0
  assert counts[~keep].sum() == 0
  expected = counts.sum() * probs[keep]
  statistic = ((counts[keep] - expected) ** 2 / expected).sum()
  df = keep.sum() - 1
  try:
    from scipy import stats  # pylint: disable=g-import-not-at-top
    critical = stats.chi2.ppf(1 - alpha, df)
  except ImportError:
    # Wilson-Hilferty: chi2 quantiles from the normal's (3.09 is its 1 - 1e-3 quantile).
    assert alpha == 1e-3
    critical = df * (1 - 2 / (9 * df) + 3.09 * np.sqrt(2 / (9 * df))) ** 3
  return statistic < critical


@pytest.mark.parametrize("key_sampling", ["nearby", "uniform"])
def test_key_frequencies(train_records, key_sampling):
  record = train_records[0]
  transform = pipeline.PieceTransform(train_records, epoch_length=1, patch_length=32, seed=7,
                                      key_sampling=key_sampling, drop_prompt=False,
                                      stream_cut=False)
  counts = np.bincount([int(transform(epoch, 0)["key"]) for epoch in range(3000)],
                       minlength=len(abc.KEYS))
  probs = pipeline.key_probs(key_sampling, record["original_major_key"].decode())
  assert chi_squared_is_plausible(counts, probs)


def test_stream_crop_matches_reference(built, train_records):
  pieces, _ = built
  by_id = {r["piece_id"].decode(): r for r in train_records}
  cuts = 0
  for piece in pieces[:3]:
    record = by_id[piece["piece_id"]]
    n_prompt = int(record["n_prompt_patches"])
    for k in (1, 8, 13):
      rows, n_metadata, cut_points = shards.key_rows(record, k)
      text = piece["augmented"][abc.KEYS[k]]
      for seed in range(6):
        for patch_length in (32, 64):
          crop = pipeline.stream_crop(rows, n_metadata, cut_points, patch_length,
                                      random.Random(seed))
          assert crop.tolist() == reference.encode_train(piece["prompt"] + text, patch_length,
                                                         random.Random(seed))
          dropped = np.concatenate([rows[:1], rows[1 + n_prompt:]])
          crop = pipeline.stream_crop(dropped, n_metadata - n_prompt, cut_points, patch_length,
                                      random.Random(seed))
          patches, kept_from = reference.encode_train_patches(text, patch_length,
                                                              random.Random(seed))
          assert crop.tolist() == reference.to_ids(patches)
          cuts += kept_from > 0
  assert cuts > 20  # the loop does exercise the cut, not only the head


def test_batches_are_the_crops_of_their_keys(shards_dir, train_records):
  iterator = pipeline.make_iterator(shards_dir, seed=3, **SMALL)
  epoch_length = len(train_records)
  for step, batch in enumerate(take(iterator, 6)):
    assert batch["patches"].shape == (2, 32, 16) and batch["patches"].dtype == np.int32
    assert batch["masks"].shape == (2, 32) and batch["masks"].dtype == np.int32
    for row in range(2):
      piece, key = int(batch["piece"][row]), int(batch["key"][row])
      epoch = (step * 2 + row) // epoch_length
      _, cut_rng = pipeline.element_rngs(3, epoch, piece)
      crop = pipeline.stream_crop(*shards.key_rows(train_records[piece], key), 32, cut_rng)
      n = len(crop)
      np.testing.assert_array_equal(batch["masks"][row], np.arange(32) < n)
      np.testing.assert_array_equal(batch["patches"][row, :n], crop)
      assert not batch["patches"][row, n:].any()


def test_short_last_batch_is_padded(built):
  pieces, shards_dir = built
  batches = list(pipeline.make_dataset(shards_dir, split="eval", num_epochs=1, **SMALL))
  assert len(batches) == 1
  masks = batches[0]["masks"]
  # The one eval piece (a chorale, the same text in every key) in one of the crops the
  # original's stream cut can make of it; the second row is empty.
  (piece,) = [p for p in pieces if p["split"] == "eval"]
  text = piece["prompt"] + piece["augmented"]["C"]
  crops = {json.dumps(reference.encode_train(text, 32, random.Random(seed)))
           for seed in range(1000)}
  row = batches[0]["patches"][0, :masks[0].sum()].tolist()
  assert json.dumps(row) in crops
  assert masks[0].tolist() == [1] * len(row) + [0] * (32 - len(row))
  assert masks[1].sum() == 0 and not batches[0]["patches"][1].any()


def test_same_seed_same_batches(shards_dir):
  run = lambda seed: take(pipeline.make_iterator(shards_dir, seed=seed, **SMALL), 8)
  assert_same(run(1), run(1))
  assert any(not np.array_equal(a["patches"], b["patches"]) for a, b in zip(run(1), run(2)))


def test_epochs_reshuffle_and_cover(shards_dir, train_records):
  batches = take(pipeline.make_iterator(shards_dir, seed=5, num_epochs=3, **SMALL), 9)
  pieces = np.concatenate([b["piece"] for b in batches]).reshape(3, -1)
  n = len(train_records)
  for epoch in pieces:
    assert sorted(epoch) == list(range(n))
  assert len({tuple(epoch) for epoch in pieces}) > 1


def test_restore_continues_exactly(shards_dir):
  config = dict(SMALL, patch_length=128, seed=11)
  iterator = pipeline.make_iterator(shards_dir, **config)
  take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 5)
  restored = pipeline.make_iterator(shards_dir, state=json.loads(json.dumps(state)), **config)
  assert_same(take(restored, 5), expected)


def test_processes_see_disjoint_pieces(shards_dir, train_records):
  seen = []
  for shard_index in range(2):
    batches = pipeline.make_dataset(shards_dir, num_epochs=1, seed=2, **dict(
        SMALL, shard_index=shard_index, shard_count=2))
    seen.append({int(b["piece"][r]) for b in batches for r in range(2) if b["masks"][r].any()})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(len(train_records)))


def test_batches_are_the_same_global_batches_on_any_number_of_processes(shards_dir):
  make = lambda index, count, batch: list(pipeline.make_dataset(shards_dir, **dict(
      SMALL, batch_size=batch, num_epochs=2, seed=5, shard_index=index, shard_count=count)))
  one = make(0, 1, 4)
  halves = [make(0, 2, 2), make(1, 2, 2)]
  assert len(one) == len(halves[0]) == len(halves[1]) > 2
  for t, batch in enumerate(one):
    for name in ("patches", "masks", "key", "piece"):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][t][name], halves[1][t][name]]), batch[name])
  # Three processes of one row: global batches of 3, the same rows in the same order.
  thirds = [make(i, 3, 1) for i in range(3)]
  rows = [third[t]["piece"][0] for t in range(len(thirds[0])) for third in thirds]
  pieces = np.concatenate([b["piece"][b["masks"].any(axis=1)] for b in one])
  np.testing.assert_array_equal(rows, pieces[:len(rows)])
  assert len(pieces) - len(rows) < 3


def test_drop_prompt(shards_dir, train_records):
  batch = next(pipeline.make_iterator(shards_dir, key_sampling="uniform", drop_prompt=True,
                                      stream_cut=False, **dict(SMALL, patch_length=512)))
  for row in range(2):
    record = train_records[int(batch["piece"][row])]
    rows, _, _ = shards.key_rows(record, int(batch["key"][row]))
    n_prompt = int(record["n_prompt_patches"])
    expected = np.concatenate([rows[:1], rows[1 + n_prompt:]])[:512]
    np.testing.assert_array_equal(batch["patches"][row, :len(expected)], expected)
    assert batch["masks"][row].sum() == len(expected)


def test_preference_batches(tmp_path, golden_dir):
  cases = json.loads((golden_dir / "cases.json").read_text())["cases"]
  # Generated text carries the markers already: the stream text is what the sampler writes.
  texts = [case["stream_text"] for case in cases]
  (tmp_path / "pairs.json").write_text(json.dumps({"chosen": texts[:2], "rejected": texts[1:]}))
  ref = {"chosen": [-1.0, -2.0], "rejected": [-5.0, -6.0]}
  (tmp_path / "ref.json").write_text(json.dumps(ref))
  ds = pipeline.preference_dataset(tmp_path / "pairs.json", batch_size=2, patch_length=128,
                                   num_epochs=1, ref_logps_path=tmp_path / "ref.json",
                                   shard_index=0, shard_count=1)
  batches = list(ds)
  assert len(batches) == 2
  encode = lambda text: reference.encode_train(text, 128, dpo=True)
  seen = set()
  for batch in batches:
    assert batch["chosen"].shape == batch["rejected"].shape == (2, 128, 16)
    assert batch["ref_chosen_logp"].dtype == np.float32
    for row in range(2):
      pair = {name: batch[name][row, :batch[f"{name}_masks"][row].sum()].tolist()
              for name in ("chosen", "rejected")}
      i = next(i for i, t in enumerate(texts[:2]) if encode(t) == pair["chosen"])
      j = next(j for j, t in enumerate(texts[1:]) if encode(t) == pair["rejected"])
      assert batch["ref_chosen_logp"][row] == ref["chosen"][i]
      assert batch["ref_rejected_logp"][row] == ref["rejected"][j]
      # The stream text's markers are kept as they are, not added again: after the bos patch,
      # the row decodes to the text and the eos patch's chr(1) (or a prefix, cut at 128 patches).
      assert (texts[i] + chr(1)).startswith(Patchilizer().decode(pair["chosen"][1:]))
      seen.add((i, j))
  assert seen == set(itertools.product(range(2), range(2)))


def test_preference_batches_are_the_same_global_batches_on_any_number_of_processes(
    tmp_path, golden_dir):
  cases = json.loads((golden_dir / "cases.json").read_text())["cases"]
  texts = [case["stream_text"] for case in cases]
  (tmp_path / "pairs.json").write_text(json.dumps({"chosen": texts, "rejected": texts[:2]}))
  # 6 pairs, 2 epochs: 12 rows, global batches of 4 then a last one of 4 (one process) ...
  make = lambda index, count, batch: list(pipeline.preference_dataset(
      tmp_path / "pairs.json", batch_size=batch, patch_length=64, num_epochs=2, seed=3,
      shard_index=index, shard_count=count))
  one = make(0, 1, 4)
  halves = [make(0, 2, 2), make(1, 2, 2)]
  assert len(one) == len(halves[0]) == len(halves[1]) == 3
  for t, batch in enumerate(one):
    for name in ("chosen", "rejected", "chosen_masks"):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][t][name], halves[1][t][name]]), batch[name])
  # ... and over three processes of 1 row, 12 = 4 global batches of 3: the same row order.
  thirds = [make(i, 3, 1) for i in range(3)]
  rows = [third[t]["chosen"][0] for t in range(4) for third in thirds]
  np.testing.assert_array_equal(np.stack(rows), np.concatenate([b["chosen"] for b in one]))


@pytest.mark.slow  # starts worker processes: runs in CI's second pass
def test_worker_processes_give_the_same_batches(shards_dir):
  config = dict(SMALL, seed=9)
  expected = take(pipeline.make_iterator(shards_dir, **config), 5)
  iterator = pipeline.make_iterator(shards_dir, num_workers=2, **config)
  assert_same(take(iterator, 2), expected[:2])
  state = iterator.get_state()
  iterator.close()
  restored = pipeline.make_iterator(shards_dir, num_workers=2, state=state, **config)
  assert_same(take(restored, 3), expected[2:])
  restored.close()
