"""DPO as two processes, the parameters FSDP-sharded across both, against one process."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from notagen_jax import checkpoint
from notagen_jax import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
HIDDEN = 128  # the tiny model's


def _pairs(golden_dir, path):
  """Four chosen x one rejected: four pairs, so that a global batch of four (one pair per device)
  holds every pair however the processes split them; five texts, so that the reference pass
  (eight rows, four per process) gives process 1 a text of its own."""
  texts = [case["stream_text"]
           for case in json.loads((golden_dir / "cases.json").read_text())["cases"]]
  head = lambda text: "".join(text.splitlines(keepends=True)[:12])  # header and a few bars
  path.write_text(json.dumps({"chosen": [*texts, head(texts[0])], "rejected": [head(texts[2])]}))
  return path


def _cmd(workdir, init, pairs, extra=()):
  return [sys.executable, "-m", "notagen_jax.train", "--config=configs/dpo.py:tiny",
          f"--workdir={workdir}", f"--config.init_checkpoint={init}",
          f"--config.data.preference_file={pairs}", "--config.train.num_steps=4",
          "--config.train.checkpoint_every=2", "--config.train.log_every=1",
          "--config.data.num_threads=0", "--config.mesh.shape=(1,4,1)", *extra]


def _env(xla_flags):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(cmd, env, log):
  """The command in the background, its output in `log` (a pipe left unread could fill and stall
  a process that its peer then waits for)."""
  with log.open("w") as out:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_all(processes, logs, timeout: int) -> None:
  """Waits for every process; each one left (waiting for a peer that failed) is killed."""
  try:
    for process in processes:
      process.wait(timeout=timeout)
  finally:
    for process in processes:
      process.kill()
  for process, log in zip(processes, logs):
    assert process.returncode == 0, log.read_text()[-3000:]


def _losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row["loss"] for row in rows if row["split"] == "train"}


def _params(directory):
  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(checkpoint.restore_params(directory))))


def _elements(dims):
  return int(np.prod([int(d) for d in dims.split(",") if d]))


@pytest.mark.slow  # about two minutes: runs in CI's second pass
def test_two_process_fsdp_dpo_equals_one_process(tmp_path, golden_dir):
  pairs = _pairs(golden_dir, tmp_path / "pairs.json")
  init = golden_dir / "tiny.pth"
  one = tmp_path / "one"
  single = subprocess.run(_cmd(one, init, pairs), cwd=REPO, capture_output=True, text=True,
                          env=_env("--xla_force_host_platform_device_count=4"), timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  two, port = tmp_path / "two", _free_port()
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  processes = [_start(
      _cmd(two, init, pairs, [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                              "--config.distributed.num_processes=2",
                              f"--config.distributed.process_id={i}"]),
      # Each process dumps the HLO of its eval step, which the reference pass runs; compiled
      # afresh, as a hit in the run's compilation cache (an earlier test's) dumps nothing.
      {**_env(f"--xla_force_host_platform_device_count=2 --xla_dump_to={tmp_path}/hlo{i} "
              "--xla_dump_hlo_module_re=eval_step"), "JAX_ENABLE_COMPILATION_CACHE": "false"},
      logs[i])
      for i in range(2)]
  _wait_all(processes, logs, timeout=900)

  # Each step's global batch holds the same pairs, each process its rows of it: equal up to the
  # rounding of ~1e4-sized log-prob sums reduced across processes, which beta and lambda carry
  # into the loss.
  expected, got = _losses(one), _losses(two)
  assert sorted(got) == [1, 2, 3, 4]
  for step in got:
    assert got[step] == pytest.approx(expected[step], rel=1e-4), step
  assert got[4] < got[1]  # it trained
  reference = [json.loads((run / trainer.REFERENCE_LOGPS).read_text()) for run in (one, two)]
  for name, n in (("chosen", 4), ("rejected", 1)):
    assert len(reference[1][name]) == n
    np.testing.assert_allclose(reference[1][name], reference[0][name], rtol=1e-5)
  for run in (one, two):
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
  # Four steps of lr 1e-6 move each weight by ~4e-6; the two runs' weights differ far less.
  for a, b in zip(_params(one / trainer.FINAL_PARAMS), _params(two / trainer.FINAL_PARAMS)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-7)

  # As saved: every weight matrix in four shards over fsdp, on the four devices of the two
  # processes (two each), so each matrix lies on both.
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(two / "checkpoints" / "4" / "state").item_metadata["params"]
  matrices = [leaf for leaf in jax.tree.leaves(saved)
              if len(leaf.shape) > 1 and np.prod(leaf.shape) >= HIDDEN ** 2]
  # The patch embedding [2048, H] and positions [256, H]; per layer (2 patch, 1 char) q/k/v
  # [H, 3, heads, 64], the attention output [heads, 64, H], fc [H, 4H] and proj [4H, H]; the char
  # embedding [128, H]. (The char positions [17, H] are smaller.)
  assert len(matrices) == 2 + 3 * 4 + 1
  for leaf in matrices:
    spec, mesh = leaf.sharding.partition_spec, leaf.sharding.device_mesh.mesh
    assert "fsdp" in spec and dict(zip(leaf.sharding.axis_names, leaf.sharding.shape))["fsdp"] == 4
    assert len({device.id for device in np.ravel(mesh)}) == 4, leaf.name
    split = spec.index("fsdp")
    assert leaf.storage.write_shape[split] * 4 == leaf.shape[split], leaf.name

  # The reference step as compiled in the two-process run takes the weights as arguments: no
  # constant of a weight matrix's size (tests/test_trainer.py checks the same on one process).
  for i in range(2):
    dumps = list((tmp_path / f"hlo{i}").glob("*jit_eval_step*.before_optimizations.txt"))
    assert dumps, f"process {i} dumped no eval step"
    for dump in dumps:
      text = dump.read_text()
      entry = re.search(r"^ENTRY .*$", text, re.MULTILINE).group(0)
      assert max(_elements(d) for d in re.findall(r"\w+\[([\d,]*)\]", entry)) >= HIDDEN ** 2
      constants = [_elements(d) for d in re.findall(r"\w+\[([\d,]*)\]\S* constant\(", text)]
      assert constants and max(constants) < HIDDEN ** 2


@pytest.mark.slow  # about a minute: runs in CI's second pass
def test_two_processes_of_one_device_export_the_trained_params(tmp_path, golden_dir):
  """One device per process (a GPU each under SLURM): the exported params include the tensors
  kept only for round trips, made global from each process's copy."""
  pairs = _pairs(golden_dir, tmp_path / "pairs.json")
  run, port = tmp_path / "run", _free_port()
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  flags = lambda i: [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                     "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
  two_devices = lambda cmd: [arg.replace("(1,4,1)", "(1,2,1)") for arg in cmd]
  processes = [_start(two_devices(_cmd(run, golden_dir / "tiny.pth", pairs, flags(i))),
                      _env("--xla_force_host_platform_device_count=1"), logs[i])
               for i in range(2)]
  _wait_all(processes, logs, timeout=600)
  assert trainer.final_params_step(run / trainer.FINAL_PARAMS) == 4
  exported = checkpoint.restore_params(run / trainer.FINAL_PARAMS).patch.unused_wte.value
  init = checkpoint.load_model(golden_dir / "tiny.pth").patch.unused_wte.value
  np.testing.assert_array_equal(np.asarray(exported), np.asarray(init))  # never trained
