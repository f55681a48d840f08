"""Data path throughput: pieces/s through `prepare`, patches/s out of the Grain loader, and the rate
the small model consumes patches in a training step on this machine, in one table.

  python benchmarks/data_throughput.py [--pieces=120] [--batches=60] [--no-model]

The sample is every k-th piece of music21's bundled corpus (all formats: MusicXML, ABC tunes,
Humdrum), so pieces/s reflects the corpus mix. The loader runs the fine-tuning settings (nearby key
sampling, stream cut) at batch 8, patch_length 2048, shuffled. The model rate is measured: a jitted
forward+backward of the small model (12/3/768, fp32, char packing) on one 1024-patch loader row, in
real patches per second (a 2048-patch row costs more than twice as much).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
import time

import numpy as np

from notagen_jax.data import corpus
from notagen_jax.data import pipeline
from notagen_jax.data import preparation
from notagen_jax.data import shards

import machine  # benchmarks/machine.py


def measure_prepare(n_pieces: int, out: pathlib.Path) -> tuple[float, dict]:
  sources = list(corpus.music21_sources())
  sample = sources[::max(1, len(sources) // n_pieces)][:n_pieces]
  start = time.perf_counter()
  report = preparation.prepare_corpus(sample, out)
  return len(sample) / (time.perf_counter() - start), report


def measure_model(shards_dir: pathlib.Path, steps: int = 2, patch_length: int = 1024) -> float:
  """Real patches per second of a small-model forward+backward on one loader row."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from notagen_jax import model as model_lib  # pylint: disable=import-outside-toplevel

  batch = next(pipeline.make_iterator(shards_dir, batch_size=1, patch_length=patch_length,
                                      seed=1))
  cfg = model_lib.config_for("small", char_packing=True)
  net = model_lib.create(dataclasses.replace(cfg, patch_length=patch_length))
  packed_len = model_lib.packed_length(batch["patches"], batch["masks"])

  @nnx.jit
  def step(net, patches, masks):
    return nnx.value_and_grad(lambda m: model_lib.forward(
        m, patches, masks, deterministic=True, packed_len=packed_len).loss)(net)

  loss, _ = step(net, batch["patches"], batch["masks"])
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for _ in range(steps):
    loss, grads = step(net, batch["patches"], batch["masks"])
  jax.block_until_ready((loss, grads))
  seconds = (time.perf_counter() - start) / steps
  return float(np.sum(batch["masks"])) / seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pieces", type=int, default=120)
  parser.add_argument("--batches", type=int, default=60)
  parser.add_argument("--no-model", dest="model", action="store_false")
  args = parser.parse_args()
  machine.print_header()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    pieces_per_s, report = measure_prepare(args.pieces, tmp / "prepared")
    start = time.perf_counter()
    shards_dir = shards.build_shards(tmp / "prepared", tmp / "shards")
    build_s = time.perf_counter() - start
    loader = pipeline.loader_throughput(shards_dir, num_batches=args.batches, warmup=5,
                                        batch_size=8, patch_length=2048, shuffle=True)
    consumed = measure_model(shards_dir) if args.model else None
  rows = [
      ("prepare (all cores)", f"{pieces_per_s:.1f} pieces/s",
       f"{report['prepared']} prepared, {report['failed']} failed"),
      ("shard build (1 process)", f"{report['prepared'] / build_s:.1f} pieces/s", ""),
      ("loader (batch 8 x 2048)", f"{loader:,.0f} patches/s", "real patches, from the masks"),
  ]
  if consumed is not None:
    rows.append(("small model fwd+bwd", f"{consumed:,.1f} patches/s",
                 "one 1024-patch row, fp32, char packing"))
  width = max(len(r[0]) for r in rows)
  for name, rate, note in rows:
    print(f"{name:<{width}}  {rate:>22}  {note}")
  if consumed is not None:
    print(f"loader / model consumption = {loader / consumed:,.0f}x")


if __name__ == "__main__":
  main()
