"""Grain pipelines from the shards: key sampling, stream cut on ids, batching, sharding.

Every random choice about one element (its key, its stream cut) comes from generators seeded by
(seed, epoch, piece index), not from the iteration order, so a batch depends only on the config and
its position: runs repeat exactly, and an iterator restored from `get_state()` (which the trainer
keeps in Orbax) continues exactly where it stopped.

Batches (per process) have static shapes:
- `patches` int32 [B, patch_length, patch_size]: pad rows are zeros.
- `masks` int32 [B, patch_length]: 1 on real patches. A short last batch is filled with empty rows.
- `key` int32 [B] (index in `abc.KEYS`) and `piece` int32 [B] (record index in the split), for
  inspection; the model ignores them.

Preference pairs for DPO come from the original's JSON `{"chosen": [texts], "rejected": [texts]}`,
every chosen x rejected pair, see `preference_dataset`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import time
from typing import Any, Sequence

from absl import flags
from etils import epath
import grain
import jax
import numpy as np

from notagen_jax.data import abc
from notagen_jax.data import shards
from notagen_jax.data.tokenizer import Patchilizer, choose_stream_start

KEY_SAMPLING = ("uniform", "nearby", "original")
# Fine-tuning's key: -3..+3 semitones around the original with these weights (/16) ...
NEARBY_OFFSETS = (-3, -2, -1, 0, 1, 2, 3)
NEARBY_WEIGHTS = (1, 2, 3, 4, 3, 2, 1)
# ... and for the pitch classes with two key signatures, this spelling's probability.
SPELLING_PROBS = {"Db": 0.8, "C#": 0.2, "B": 0.8, "Cb": 0.2, "F#": 0.5, "Gb": 0.5}


def key_probs(key_sampling: str, original_major_key: str) -> np.ndarray:
  """The probability of each of `abc.KEYS` being the training key of one piece."""
  if key_sampling not in KEY_SAMPLING:
    raise ValueError(f"key_sampling {key_sampling!r} is not one of {KEY_SAMPLING}")
  probs = np.zeros(len(abc.KEYS))
  if key_sampling == "uniform":
    probs[:] = 1 / len(abc.KEYS)
  elif key_sampling == "original":
    probs[abc.KEYS.index(original_major_key)] = 1
  else:
    origin = abc.key_semitone(original_major_key)
    weights = dict(zip(((origin + d) % 12 for d in NEARBY_OFFSETS), NEARBY_WEIGHTS))
    for k, key in enumerate(abc.KEYS):
      probs[k] = weights.get(abc.key_semitone(key), 0) / 16 * SPELLING_PROBS.get(key, 1.0)
  return probs


def stream_crop(rows: np.ndarray, n_metadata: int, cut_points: Sequence[int], patch_length: int,
                rng: random.Random | None) -> np.ndarray:
  """The original's stream cut on stored ids: metadata + body from the drawn line, truncated.

  Equal to `Patchilizer.encode_train(text, rng)` with the same rng state; rng None keeps the head.
  """
  start = 0 if rng is None else choose_stream_start(list(cut_points), len(rows), patch_length, rng)
  return np.concatenate([rows[:n_metadata], rows[n_metadata + start:]])[:patch_length]


def element_rngs(seed: int, epoch: int, piece: int) -> tuple[np.random.Generator, random.Random]:
  """(key rng, stream-cut rng) of one piece in one epoch."""
  key_seq, cut_seq = np.random.SeedSequence([seed, epoch, piece]).spawn(2)
  return np.random.default_rng(key_seq), random.Random(int(cut_seq.generate_state(1, np.uint64)[0]))


def pad_rows(rows: np.ndarray, patch_length: int) -> dict[str, np.ndarray]:
  """One piece's rows padded to patch_length, with its mask."""
  patches = np.zeros((patch_length, rows.shape[1]), np.int32)
  patches[:len(rows)] = rows
  masks = np.zeros(patch_length, np.int32)
  masks[:len(rows)] = 1
  return {"patches": patches, "masks": masks}


def pad_example(example: dict[str, np.ndarray], patch_length: int) -> dict[str, np.ndarray]:
  return {**pad_rows(example["rows"], patch_length), "key": example["key"],
          "piece": example["piece"]}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Fills a short last batch with empty rows (all masks 0) to keep the shapes static."""
  missing = batch_size - len(next(iter(batch.values())))
  if not missing:
    return batch
  return {name: np.concatenate([value, np.zeros((missing, *value.shape[1:]), value.dtype)])
          for name, value in batch.items()}


@dataclasses.dataclass(frozen=True)
class PieceTransform:
  """(position in the repeated stream, piece index) -> one training example (unpadded rows)."""
  source: Any
  epoch_length: int
  patch_length: int
  seed: int
  key_sampling: str
  drop_prompt: bool
  stream_cut: bool

  def __call__(self, position: int, piece: int) -> dict[str, np.ndarray]:
    record = self.source[piece]
    key_rng, cut_rng = element_rngs(self.seed, position // self.epoch_length, piece)
    probs = key_probs(self.key_sampling, record["original_major_key"].decode())
    key = int(key_rng.choice(len(abc.KEYS), p=probs))
    rows, n_metadata, cut_points = shards.key_rows(record, key)
    if self.drop_prompt:
      n_prompt = int(record["n_prompt_patches"])
      rows = np.concatenate([rows[:1], rows[1 + n_prompt:]])
      n_metadata -= n_prompt
    rows = stream_crop(rows, n_metadata, cut_points, self.patch_length,
                       cut_rng if self.stream_cut else None)
    return {"rows": rows, "key": np.int32(key), "piece": np.int32(piece)}


def read(ds: grain.MapDataset, num_threads: int, num_workers: int) -> grain.IterDataset:
  """Elements made by num_threads threads in each of num_workers processes (0: this one).

  The workers make elements, not batches, so batches are the same with or without them; a state
  saved with one num_workers restores only with the same num_workers.
  """
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=64))
  if not num_workers:
    return ds
  # Grain's workers read absl flags; outside an absl app (tests, notebooks) none were parsed.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def batch_padded(ds: grain.IterDataset, batch_size: int) -> grain.IterDataset:
  ds = ds.batch(batch_size, drop_remainder=False)
  return ds.map(functools.partial(pad_batch, batch_size=batch_size))


def make_dataset(shards_dir: epath.PathLike, *, split: str = "train", batch_size: int = 8,
                 patch_length: int = 2048, key_sampling: str = "nearby",
                 drop_prompt: bool = False, stream_cut: bool = True, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 shard_index: int | None = None, shard_count: int | None = None,
                 num_threads: int = 2, num_workers: int = 0) -> grain.IterDataset:
  """The training (or eval) batches of one process; `iter()` gives a checkpointable iterator.

  key_sampling: 'uniform' (pre-training), 'nearby' (fine-tuning) or 'original' (the piece's key).
  drop_prompt: drops the `%` prompt patches (pre-training on shards built with the prompt).
  num_epochs: None repeats forever; each epoch has its own shuffle, keys and cuts.
  shard_index / shard_count: this process among all (default: JAX's process index and count).
    The pieces are shuffled once for all processes and each takes its rows of every global batch
    (`global_batch_rows`), so batches are the same on any number of processes.
  num_threads: reading threads per process; num_workers: worker processes (0: none).
  """
  source = shards.open_split(shards_dir, split)
  indices = grain.MapDataset.range(len(source))
  if shuffle:
    indices = indices.shuffle(seed=seed)
  transform = PieceTransform(source, len(source), patch_length, seed, key_sampling,
                             drop_prompt, stream_cut)
  mine = global_batch_rows(indices.repeat(num_epochs).map_with_index(transform), batch_size,
                           shard_index, shard_count)
  if not len(mine):
    raise ValueError(f"split {split!r} of {shards_dir} leaves no piece to this process")
  ds = read(mine, num_threads, num_workers)
  return batch_padded(ds.map(functools.partial(pad_example, patch_length=patch_length)), batch_size)


def make_iterator(shards_dir: epath.PathLike, state: dict[str, Any] | None = None,
                  **kwargs) -> grain.DatasetIterator:
  """An iterator over `make_dataset(shards_dir, **kwargs)`, restored from `state` if given."""
  iterator = iter(make_dataset(shards_dir, **kwargs))
  if state is not None:
    iterator.set_state(state)
  return iterator


def preference_pairs(pairs_path: epath.PathLike) -> tuple[list[str], list[str]]:
  """The chosen and rejected texts of the original's preference JSON; ValueError naming the file,
  key and entry where it is not `{"chosen": [texts], "rejected": [texts]}`."""
  try:
    data = json.loads(epath.Path(pairs_path).read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{pairs_path}: not JSON: {error}") from error
  if not isinstance(data, dict):
    raise ValueError(f"{pairs_path}: holds a {type(data).__name__}, not "
                     '{"chosen": [texts], "rejected": [texts]}')
  texts = []
  for key in ("chosen", "rejected"):
    if key not in data:
      raise ValueError(f"{pairs_path}: no {key!r} key")
    if not isinstance(data[key], list):
      raise ValueError(f"{pairs_path}: {key!r} is not a list of ABC texts but "
                       f"{json.dumps(data[key])[:60]}")
    for i, text in enumerate(data[key]):
      if not isinstance(text, str):
        raise ValueError(f"{pairs_path}: {key}[{i}] is not an ABC text but {json.dumps(text)[:60]}")
    texts.append(data[key])
  return texts[0], texts[1]


@dataclasses.dataclass(frozen=True)
class PairTransform:
  """Pair index (chosen-major: i * n_rejected + j) -> padded chosen and rejected patches."""
  chosen: list[np.ndarray]
  rejected: list[np.ndarray]
  patch_length: int
  ref_logps: tuple[np.ndarray, np.ndarray] | None  # each chosen and rejected text's

  def __call__(self, pair: int) -> dict[str, np.ndarray]:
    i, j = divmod(pair, len(self.rejected))
    chosen = pad_rows(self.chosen[i], self.patch_length)
    rejected = pad_rows(self.rejected[j], self.patch_length)
    example = {"chosen": chosen["patches"], "chosen_masks": chosen["masks"],
               "rejected": rejected["patches"], "rejected_masks": rejected["masks"]}
    if self.ref_logps is not None:
      example["ref_chosen_logp"] = self.ref_logps[0][i]
      example["ref_rejected_logp"] = self.ref_logps[1][j]
    return example


def preference_ids(patchilizer: Patchilizer, text: str) -> np.ndarray:
  """A DPO text's ids: generated text already carries `[r:` markers; none added, no stream cut."""
  return np.asarray(patchilizer.encode_train(text, stream=False, body_rule="starts_marker"),
                    np.int32)


def preference_dataset(pairs_path: epath.PathLike, *, batch_size: int = 1,
                       patch_length: int = 1024, patch_size: int = 16, seed: int = 0,
                       shuffle: bool = True, num_epochs: int | None = None,
                       ref_logps_path: epath.PathLike | None = None,
                       shard_index: int | None = None,
                       shard_count: int | None = None) -> grain.IterDataset:
  """DPO batches: `chosen`, `rejected` int32 [B, patch_length, patch_size], their `*_masks`.

  Texts are encoded as the original's DPO step does: generated text already carries the `[r:`
  markers, so the body starts at the first line beginning `[r:`, none are added, no stream cut.
  ref_logps_path: optional JSON `{"chosen": [...], "rejected": [...]}`, the reference's summed
  log-prob of each text (what the trainer's reference pass writes), added to the batches as
  float32 [B] fields `ref_chosen_logp` and `ref_rejected_logp`.
  """
  patchilizer = Patchilizer(patch_size=patch_size, patch_length=patch_length)
  encode = functools.partial(preference_ids, patchilizer)
  chosen, rejected = preference_pairs(pairs_path)
  n_pairs = len(chosen) * len(rejected)
  ref_logps = None
  if ref_logps_path is not None:
    values = json.loads(epath.Path(ref_logps_path).read_text())
    ref_logps = tuple(np.asarray(values[name], np.float32) for name in ("chosen", "rejected"))
    for name, texts, logps in zip(("chosen", "rejected"), (chosen, rejected), ref_logps):
      if len(logps) != len(texts):
        raise ValueError(f"{ref_logps_path}: {len(logps)} {name} values for {len(texts)} texts")
  indices = grain.MapDataset.range(n_pairs)
  if shuffle:
    indices = indices.shuffle(seed=seed)
  indices = global_batch_rows(indices.repeat(num_epochs), batch_size, shard_index, shard_count)
  transform = PairTransform([encode(t) for t in chosen], [encode(t) for t in rejected],
                            patch_length, ref_logps)
  return batch_padded(read(indices.map(transform), num_threads=0, num_workers=0), batch_size)


def global_batch_rows(ds: grain.MapDataset, batch_size: int, shard_index: int | None = None,
                      shard_count: int | None = None) -> grain.MapDataset:
  """This process's rows of each global batch of `ds` (`batch_size` rows per process).

  Global batch t is ds[t * B : (t + 1) * B] (B = batch_size x processes) whatever the number of
  processes, so a run trains on the same batches on one process or several. A last, partial
  global batch is split evenly: at most processes - 1 rows are dropped, none on one process.
  """
  index = jax.process_index() if shard_index is None else shard_index
  count = jax.process_count() if shard_count is None else shard_count
  width = batch_size * count
  full, rest = divmod(len(ds), width)
  tail = rest // count

  def position(j: int) -> int:
    batch, row = divmod(j, batch_size)
    if batch < full:
      return batch * width + index * batch_size + row
    return full * width + index * tail + row

  return grain.MapDataset.range(full * batch_size + tail).map(lambda j: ds[position(j)])


def loader_throughput(shards_dir: epath.PathLike, num_batches: int = 50, warmup: int = 5,
                      **kwargs) -> float:
  """Real patches (mask 1) per second through `make_dataset(shards_dir, **kwargs)`.

  Padded slots per second are num_batches * batch_size * patch_length over the same time.
  """
  iterator = make_iterator(shards_dir, **kwargs)
  for _ in range(warmup):
    next(iterator)
  patches = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    patches += int(next(iterator)["masks"].sum())
  return patches / (time.perf_counter() - start)
