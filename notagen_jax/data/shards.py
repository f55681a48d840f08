"""The TFDS ArrayRecord builder: one record per prepared piece, its 15 keys' training ids.

A record holds the full (uncut) training encoding of every transposition, with the stream markers
added, so the pipeline samples a key and makes the stream cut on ids without ever tokenizing:

- `ids` uint8 [sum_k P_k, patch_size]: the 15 encodings in `abc.KEYS` order, back to back; key k
  owns rows `key_offsets[k]:key_offsets[k + 1]`.
- `n_metadata` int32 [15]: metadata patches per key (bos patch and prompt patches included).
- `cut_points` int32 [sum_k C_k]: per key the body patch indices where a body line starts (what
  `tokenizer.choose_stream_start` takes); key k owns `cut_offsets[k]:cut_offsets[k + 1]`.
- `n_prompt_patches` int32: with the prompt built in, its `%` lines are metadata lines right after
  the bos patch, so a pre-training pipeline drops rows 1..n_prompt_patches exactly.
- `piece_id`, `source`, `original_key` (the K: field), `original_major_key`, `period`, `composer`,
  `instrumentation`: text.

Build a small corpus from Python with `build_shards(prepared_dir, out_dir)`. The same builder makes
the 1.6M-piece corpus on Apache Beam (`build_shards(..., beam_options=...)`, or `prepare
--beam_options`; docs/data_at_scale.md has the commands): tokenizing 15 transpositions per piece is
the cost, and Beam spreads it over workers. The driver reads only PREPARED/index.jsonl (which
`prepare` writes), to learn which splits have pieces; the workers read it again for the piece files,
so the job carries no list of 1.6M paths (Dataflow refuses job requests over 20 MB). With a Beam
runner or options configured, `_generate_examples` returns a Beam PTransform; otherwise it is a
plain generator and Beam is never imported. Both routes write the same records (tests/test_beam.py).
A record takes about 15 * 16 bytes per patch, ~120 KB for a piece of 500 patches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from typing import Any, Iterable

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from notagen_jax import storage
from notagen_jax.data import abc
from notagen_jax.data.tokenizer import Patchilizer, chunk, text_lines

SPLITS = ("train", "eval")
_INFO = "dataset_info.json"  # a built dataset's description: TFDS reuses a build that has it


@dataclasses.dataclass(eq=False)
class ShardsConfig(tfds.core.BuilderConfig):
  """patch_size: characters per patch; with_prompt: whether the `%` prompt opens the metadata."""
  patch_size: int = 16
  with_prompt: bool = True


def config_name(patch_size: int, with_prompt: bool) -> str:
  return f"p{patch_size}_{'prompt' if with_prompt else 'no_prompt'}"


def prompt_patches(prompt: str, patch_size: int) -> list[str]:
  """The prompt's `%` lines as the metadata patches they become."""
  return [p for line in text_lines(prompt) for p in chunk(line, patch_size)]


def encode_piece(piece: dict[str, Any], patch_size: int = 16,
                 with_prompt: bool = True) -> dict[str, Any]:
  """A prepared piece (the JSON of `prepare`) as a shard record."""
  # patch_length only matters for the cut, which the record leaves to the pipeline.
  patchilizer = Patchilizer(patch_size=patch_size)
  prompt = piece["prompt"] if with_prompt else ""
  if prompt and not prompt.endswith("\n"):
    prompt += "\n"
  prompt_rows = prompt_patches(prompt, patch_size)
  ids, n_metadata, cut_points, key_offsets, cut_offsets = [], [], [], [0], [0]
  for key in abc.KEYS:
    encoding = patchilizer.full_encoding(prompt + piece["augmented"][key])
    if encoding.metadata[1:1 + len(prompt_rows)] != prompt_rows:
      raise ValueError(f"{piece['piece_id']} ({key}): the prompt does not open the metadata")
    ids.append(np.asarray(patchilizer.to_ids(encoding.patches()), np.uint8))
    n_metadata.append(len(encoding.metadata))
    cut_points += encoding.cut_points
    key_offsets.append(key_offsets[-1] + len(ids[-1]))
    cut_offsets.append(len(cut_points))
  return {
      "piece_id": piece["piece_id"],
      "source": str(piece.get("source", "")),
      "original_key": piece["original_key"],
      "original_major_key": abc.major_key(piece["original_key"]),
      "period": piece.get("period") or "",
      "composer": piece.get("composer") or "",
      "instrumentation": piece.get("instrumentation") or "",
      "n_prompt_patches": np.int32(len(prompt_rows)),
      "ids": np.concatenate(ids),
      "key_offsets": np.asarray(key_offsets, np.int32),
      "n_metadata": np.asarray(n_metadata, np.int32),
      "cut_points": np.asarray(cut_points, np.int32),
      "cut_offsets": np.asarray(cut_offsets, np.int32),
  }


def piece_example(path: str, patch_size: int, with_prompt: bool) -> tuple[str, dict[str, Any]]:
  """(key, record) of one piece file; module-level so that Beam can pickle it."""
  piece = json.loads(storage.path(path).read_text())
  return piece["piece_id"], encode_piece(piece, patch_size, with_prompt)


def _indexed_file(prepared_dir: epath.Path, row: dict[str, str]) -> str:
  """The piece file that a row of PREPARED/index.jsonl names."""
  return str(prepared_dir / row["file"])


def piece_paths_by_split(prepared_dir: epath.PathLike) -> dict[str, list[str]]:
  """The piece files of PREPARED grouped by split, in sorted order.

  Uses PREPARED/index.jsonl (written by prepare) when present; otherwise reads every piece file's
  `split` field, one serial pass that is slow on a large corpus.
  """
  by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
  prepared_dir = storage.path(prepared_dir)
  index = prepared_dir / "index.jsonl"
  if index.exists():
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    entries = sorted((_indexed_file(prepared_dir, row), row["split"]) for row in rows)
  else:
    paths = [p for p in storage.files_under(prepared_dir / "pieces") if p.suffix == ".json"]
    entries = [(str(path), json.loads(path.read_text())["split"]) for path in paths]
  for path, split in entries:
    if split not in by_split:
      raise ValueError(f"{path}: split {split!r} is not one of {SPLITS}")
    by_split[split].append(path)
  return by_split


class _ShardWriter(tfds.core.ExampleWriter):
  """ArrayRecord shards anywhere: array_record writes local files only, so a shard bound for an
  object store (a Beam worker writing to gs://) is written to a local file, then uploaded."""

  def write(self, path: epath.PathLike, examples: Iterable[Any]) -> Any:
    with storage.local_output(path) as local:
      return super().write(local, examples)


class NotagenShards(tfds.core.GeneratorBasedBuilder):
  """NotaGen's training pieces, every transposition tokenized (markers added, uncut)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: ids of the 15 keys per piece, metadata sizes, cut points, prompt.",
  }
  BUILDER_CONFIGS = [ShardsConfig(name=config_name(16, with_prompt), patch_size=16,
                                  with_prompt=with_prompt) for with_prompt in (True, False)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the output directory of `python -m notagen_jax.prepare` (it holds pieces/**/*.json) "
      "as --manual_dir.")
  _use_beam = False

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    # Grain reads ArrayRecord, and writing tfds' default (TFRecord) would need TensorFlow.
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    n_keys = len(abc.KEYS)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "piece_id": tfds.features.Text(),
            "source": tfds.features.Text(),
            "original_key": tfds.features.Text(),
            "original_major_key": tfds.features.Text(),
            "period": tfds.features.Text(),
            "composer": tfds.features.Text(),
            "instrumentation": tfds.features.Text(),
            "n_prompt_patches": np.int32,
            "ids": tfds.features.Tensor(shape=(None, self.builder_config.patch_size),
                                        dtype=np.uint8),
            "key_offsets": tfds.features.Tensor(shape=(n_keys + 1,), dtype=np.int32),
            "n_metadata": tfds.features.Tensor(shape=(n_keys,), dtype=np.int32),
            "cut_points": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "cut_offsets": tfds.features.Tensor(shape=(n_keys + 1,), dtype=np.int32),
        }),
        homepage="https://github.com/ElectricAlexis/NotaGen",
    )

  def _download_and_prepare(self, dl_manager: tfds.download.DownloadManager,
                            download_config: tfds.download.DownloadConfig) -> None:
    # Beam is wanted exactly when a runner or options are configured (tfds build's flags).
    self._use_beam = bool(download_config.beam_runner or download_config.beam_options)
    super()._download_and_prepare(dl_manager, download_config)

  def _example_writer(self) -> tfds.core.ExampleWriter:
    return _ShardWriter(file_format=self.info.file_format)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    # The writer refuses an empty split, so only splits that have pieces are made.
    prepared_dir = dl_manager.manual_dir
    return {split: self._generate_examples(prepared_dir, split, paths)
            for split, paths in piece_paths_by_split(prepared_dir).items() if paths}

  def _generate_examples(self, prepared_dir: epath.Path, split: str,
                         paths: list[str]) -> Iterable[tuple[str, dict[str, Any]]]:
    encode = functools.partial(piece_example, patch_size=self.builder_config.patch_size,
                               with_prompt=self.builder_config.with_prompt)
    if not self._use_beam:
      return map(encode, paths)
    index = prepared_dir / "index.jsonl"
    if not index.exists():
      raise ValueError(f"{prepared_dir}: the Beam route reads index.jsonl, which prepare writes")
    beam = tfds.core.lazy_imports.apache_beam
    # Reshuffled so that the pieces, not runs of index lines, are what workers share out.
    return ("ReadIndex" >> beam.io.ReadFromText(os.fspath(index))
            | "Rows" >> beam.Map(json.loads)
            | "OfSplit" >> beam.Filter(lambda row: row["split"] == split)
            | "Files" >> beam.Map(functools.partial(_indexed_file, prepared_dir))
            | "Spread" >> beam.Reshuffle()
            | "Encode" >> beam.Map(encode))


def build_shards(prepared_dir: epath.PathLike, out_dir: epath.PathLike, patch_size: int = 16,
                 with_prompt: bool = True, beam_options: Any = None) -> epath.Path:
  """Builds the shards of a prepared dir under out_dir; returns the versioned dataset dir.

  A build of the same config and version already there is reused: after changing the prepared
  data, build into a new out_dir (or bump `NotagenShards.VERSION` when the record format changes).
  beam_options: `apache_beam.options.pipeline_options.PipelineOptions` to generate with Beam
  (straight into out_dir: its workers need not share a disk with this process).

  ArrayRecord cannot write to an object store, so without Beam a `gs://` out_dir gets shards built
  in a local temporary folder and then uploaded.
  """
  name = config_name(patch_size, with_prompt)
  config = next((c for c in NotagenShards.BUILDER_CONFIGS if c.name == name),
                ShardsConfig(name=name, patch_size=patch_size, with_prompt=with_prompt))
  download_config = tfds.download.DownloadConfig(manual_dir=storage.path(prepared_dir),
                                                 beam_options=beam_options)
  if beam_options is not None or not storage.is_remote(out_dir):
    builder = NotagenShards(config=config, data_dir=storage.path(out_dir))
    builder.download_and_prepare(download_config=download_config)
    return epath.Path(builder.data_dir)
  with tempfile.TemporaryDirectory() as tmp:
    builder = NotagenShards(config=config, data_dir=tmp)
    built = epath.Path(builder.data_dir)
    target = storage.path(out_dir) / built.relative_to(tmp).as_posix()
    if not (target / _INFO).exists():
      builder.download_and_prepare(download_config=download_config)
      # The info file last: it marks a finished build, so a cut-off upload is not reused.
      for file in sorted(storage.files_under(built), key=lambda f: f.name == _INFO):
        storage.copy_file(file, target / file.relative_to(built).as_posix())
  return target


def open_split(shards_dir: epath.PathLike, split: str = "train") -> Any:
  """Random-access source (len, __getitem__) over one split of a built dataset dir; no TF needed."""
  return tfds.builder_from_directory(storage.path(shards_dir)).as_data_source(split=split)


def key_rows(record: dict[str, Any], key_index: int) -> tuple[np.ndarray, int, np.ndarray]:
  """(ids [P, patch_size], n_metadata, cut_points) of one key of a record."""
  start, end = record["key_offsets"][key_index:key_index + 2]
  cut_start, cut_end = record["cut_offsets"][key_index:key_index + 2]
  return (record["ids"][start:end], int(record["n_metadata"][key_index]),
          record["cut_points"][cut_start:cut_end])

