"""Training and sampling throughput on this machine's accelerator: the trainer's step and MFU, the
sampler's characters per second, constrained and not.

  python benchmarks/accelerator_throughput.py [--train=small:pretrain:float32:8,...]
      [--sample=small:bfloat16:32:free,...] [--steps=5] [--out=rows.jsonl]

Meant for a GPU or TPU host (on a CPU it runs, slowly; use tiny sizes there). Every row is printed
as one JSON line when it is done (and appended to `--out`), so a run cut short keeps its rows; a
row that fails (out of memory, say) prints its error and the next one runs.

Train rows `SIZE:MODE:DTYPE:ROWS` (ROWS per device, the data-parallel mesh over every local
device): `trainer.build_setup` and `trainer.make_train_step` from `config.base_config(MODE, SIZE)`
with `model.dtype` DTYPE, as `python -m notagen_jax.train` builds them (AdamW, dropout as the
mode's config; DPO with precomputed reference log-probs, one pair = 2 rows). Every row is a full
piece of `patch_length` real patches of random characters (the model's work does not depend on the
characters; real data pads shorter pieces, which the trainer counts as no work). After a first
step that compiles (its time reported as `compile_s`), `--steps` steps are timed together up to
the last loss on the host. `tflops_per_device` and `mfu` are what `train_and_evaluate` logs
(`trainer.step_flops`: 3x the forward matmul FLOPs of the real patches; MFU against
`trainer.PEAK_FLOPS` for the device kind); `mfu_measured` divides by the best bfloat16 matmul rate
measured here first (`peak` row: `generate_throughput.peak_meter`'s best of 10 8192^3
products, float32 sums), the ceiling this chip reaches.

Sample rows `SIZE:WEIGHTS:BATCH:free|constrained`: `sampling.Sampler` over a randomly initialized
model of SIZE (compute dtype bfloat16 for bfloat16/int8 weights, else float32) with `dtype=WEIGHTS`
(the blocks' matrices as stored for sampling), BATCH copies of the prompt
`%Baroque\\n%Bach, Johann Sebastian\\n%Choral\\n`, the original's CLaMP-DPO sampling settings and
each piece stopped after 64 patches (a constrained one at the end of its line). A first run compiles; the second is timed. `chars_per_s`
counts the characters drawn (a constrained random model ends pieces early: compare `slot_chars_per_s`,
the char positions the compiled loop ran, rows of ended pieces included).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

import generate_throughput  # benchmarks/generate_throughput.py
import machine  # benchmarks/machine.py

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from notagen_jax import config as config_lib  # pylint: disable=wrong-import-position
from notagen_jax import model as model_lib  # pylint: disable=wrong-import-position
from notagen_jax import sampling  # pylint: disable=wrong-import-position
from notagen_jax import sharding  # pylint: disable=wrong-import-position
from notagen_jax import trainer  # pylint: disable=wrong-import-position

PROMPT = "%Baroque\n%Bach, Johann Sebastian\n%Choral\n"
SAMPLE_PATCHES = 64


def _emit(row: dict, out: pathlib.Path | None) -> None:
  line = json.dumps(row)
  print(line, flush=True)
  if out is not None:
    with out.open("a") as f:
      f.write(line + "\n")


def _train_batch(setup: trainer.Setup, rows: int, rng: np.random.Generator) -> dict:
  cfg = setup.model_cfg
  shape = (rows, cfg.patch_length, cfg.patch_size)
  pieces = lambda: rng.integers(3, cfg.vocab, shape, dtype=np.int32)
  full = np.ones(shape[:2], np.int32)
  if setup.config.mode != "dpo":
    return {"patches": pieces(), "masks": full}
  return {"chosen": pieces(), "chosen_masks": full, "rejected": pieces(),
          "rejected_masks": full, "ref_chosen_logp": np.full((rows,), -1e3, np.float32),
          "ref_rejected_logp": np.full((rows,), -1e3, np.float32)}


def train_row(spec: str, steps: int, peak: float | None) -> dict:
  size, mode, dtype, per_device = spec.split(":")
  c = config_lib.base_config(mode, size)
  c.model.dtype = dtype
  c.data.batch_size, c.data.per_device_batch_size = 0, int(per_device)
  setup = trainer.build_setup(c)
  step = trainer.make_train_step(setup)
  rows = config_lib.global_batch_size(c, sharding.data_parallel_size(setup.mesh))
  local = _train_batch(setup, rows, np.random.default_rng(0))
  batch = sharding.global_batch(local, setup.mesh)
  state = setup.state

  start = time.perf_counter()
  state, metrics = step(state, setup.reference, batch)
  float(metrics["loss"])
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, setup.reference, batch)
  float(metrics["loss"])
  seconds = (time.perf_counter() - start) / steps

  flops = trainer.step_flops(setup, local)
  tflops = flops / seconds / jax.device_count()
  table_peak = trainer.peak_flops(c)
  return {"row": "train", "spec": spec, "devices": jax.device_count(), "rows": rows,
          "compile_s": round(compile_s, 1), "step_s": round(seconds, 4),
          "chars_per_s": round(float(metrics["n_chars"]) / seconds),
          "tflops_per_device": round(tflops / 1e12, 1),
          "mfu": round(tflops / table_peak, 3) if table_peak else None,
          "mfu_measured": round(tflops / peak, 3) if peak else None}


def sample_row(spec: str) -> dict:
  size, weights, batch, mode = spec.split(":")
  batch = int(batch)
  compute = "bfloat16" if weights in ("bfloat16", "int8") else "float32"
  model = model_lib.create(model_lib.config_for(size, dtype=compute))
  settings = sampling.Settings(max_patches=SAMPLE_PATCHES, constrained=mode == "constrained")
  sampler = sampling.Sampler(model, settings, batch=batch, dtype=weights)
  prompts = [PROMPT] * batch
  start = time.perf_counter()
  sampler.run(prompts, seed=0)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  results = sampler.run(prompts, seed=1)
  seconds = time.perf_counter() - start
  drawn = sum(len(r.text) - len(r.prompt) for r in results)
  calls = -(-max(r.patches for r in results) // sampler.patches_per_call)
  slots = batch * calls * sampler.patches_per_call * model.cfg.patch_size
  return {"row": "sample", "spec": spec, "devices": len(sampler.mesh.devices.flat),
          "first_run_s": round(compile_s, 1), "seconds": round(seconds, 2),
          "pieces_per_s": round(batch / seconds, 3), "chars_per_s": round(drawn / seconds),
          "slot_chars_per_s": round(slots / seconds)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--train", default="small:pretrain:float32:8,small:pretrain:bfloat16:8,"
                      "large:pretrain:bfloat16:8,large:dpo:bfloat16:1")
  parser.add_argument("--sample", default="small:float32:1:free,small:bfloat16:1:free,"
                      "small:bfloat16:32:free,small:bfloat16:32:constrained,"
                      "small:bfloat16:128:free,large:bfloat16:1:free,large:bfloat16:32:free")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()

  device = jax.devices()[0]
  _emit({"row": "machine", "host": machine.describe(), "device": device.device_kind,
         "platform": device.platform, "local_devices": jax.local_device_count(),
         "jax": jax.__version__}, args.out)
  peak = (generate_throughput.peak_meter("bfloat16", shapes=((8192, 8192, 8192),))(repeats=10)
          if device.platform != "cpu" else None)
  _emit({"row": "peak", "bf16_tflops": round(peak / 1e12, 1) if peak else None}, args.out)
  rows = [(spec, lambda spec: train_row(spec, args.steps, peak))
          for spec in filter(None, args.train.split(","))]
  rows += [(spec, sample_row) for spec in filter(None, args.sample.split(","))]
  for spec, measure in rows:
    try:
      _emit(measure(spec), args.out)
    except Exception as e:  # pylint: disable=broad-except
      # One row out of memory (or failing to compile) says so; the rows after it still run.
      _emit({"row": "error", "spec": spec, "error": f"{type(e).__name__}: {e}"[:2000]}, args.out)


if __name__ == "__main__":
  main()
