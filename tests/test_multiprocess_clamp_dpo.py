"""CLaMP-DPO as two processes (launch/local.sh, the distributed flags) against one process, and a
run stopped during sampling that goes on with another number of processes."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from notagen_jax import checkpoint
from notagen_jax import generation
from notagen_jax import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
PIECES = 8


def _flags(init, prepared):
  return [f"--config.init_checkpoint={init}", f"--config.ground_truth.prepared_dir={prepared}",
          "--config.iterations=1", f"--config.sample.num_pieces={PIECES}",
          "--config.sample.batch=4", "--config.sample.max_chars=1200",
          "--config.select.fraction=0.5", "--config.select.filters=()",
          "--config.scorer.workers=1", "--config.train.train.num_steps=2"]


def _launch(workdir, processes, devices, flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(
      ["bash", "launch/local.sh", f"--workdir={workdir}", "--module=clamp_dpo",
       f"--num_processes={processes}", f"--devices_per_process={devices}",
       f"--python={sys.executable}", "--", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


def _texts(workdir, k):
  return {p.name: p.read_text() for p in sorted((workdir / f"iteration_{k}" / "samples").glob(
      "piece_?????.abc"))}


def _params(directory):
  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(checkpoint.restore_params(directory))))


@pytest.mark.slow  # about nine minutes here: three clamp_dpo runs, each sampling twice and training
def test_two_processes_equal_one_and_a_stopped_run_goes_on(tmp_path, golden_dir, corpus_shards):
  prepared = pathlib.Path(corpus_shards).parents[3] / "prepared"
  init = golden_dir / "tiny.pth"
  one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
  # One process of four devices, two of two each: the same mesh for DPO, and each process's
  # sampler spreads its rows over its devices too.
  done = _launch(one, 1, 4, _flags(init, prepared))
  assert done.returncode == 0, done.stderr[-3000:]
  done = _launch(two, 2, 2, _flags(init, prepared))
  assert done.returncode == 0, done.stderr[-3000:]

  # A run stopped during the first sampling with three pieces drawn (their files and records),
  # then started again as two processes.
  samples = resumed / "iteration_0" / "samples"
  samples.mkdir(parents=True)
  for i in (0, 3, 5):
    for path in (one / "iteration_0" / "samples").glob(f"{generation.piece_name(i)}.*"):
      shutil.copy(path, samples / path.name)
  done = _launch(resumed, 2, 2, _flags(init, prepared))
  assert done.returncode == 0, done.stderr[-3000:]

  # The same pairs in the same global batches on every topology, so the trained policies agree to
  # float tolerance (one process sums the devices' gradients in another order than two) and the
  # iterations' pieces, scores and pairs are the same.
  for k in (0, 1):
    expected = _texts(one, k)
    # (A random tiny model stops some pieces at once, in the same few ways: a few repeat.)
    assert len(expected) == PIECES and len(set(expected.values())) > PIECES // 2
    scores = json.loads((one / f"iteration_{k}" / "scores.json").read_text())
    for run in (two, resumed):
      assert _texts(run, k) == expected, (run, k)
      run_scores = json.loads((run / f"iteration_{k}" / "scores.json").read_text())
      np.testing.assert_allclose(np.array(run_scores["scores"], float),
                                 np.array(scores["scores"], float), rtol=0, atol=1e-6)
      assert (run_scores["chosen"], run_scores["rejected"]) == (
          scores["chosen"], scores["rejected"])
  pairs = (one / "iteration_0" / "preferences.json").read_text()
  assert json.loads(pairs)["chosen"] and json.loads(pairs)["rejected"]
  for run in (two, resumed):
    assert (run / "iteration_0" / "preferences.json").read_text() == pairs
    assert json.loads((run / "summary.json").read_text()) == json.loads(
        (one / "summary.json").read_text())
    for a, b in zip(_params(one / "iteration_0" / "train" / trainer.FINAL_PARAMS),
                    _params(run / "iteration_0" / "train" / trainer.FINAL_PARAMS)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
