"""Runs whose every input and output is a gs:// URL, against a local GCS emulator."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from etils import epath

import gcs_emulator
import torch_reference
from notagen_jax import storage
from notagen_jax import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "gs://notagen-test"


@pytest.fixture(scope="module")
def gcs():
  with gcs_emulator.running(BUCKET.removeprefix("gs://")) as env:
    yield env


@pytest.fixture(scope="module")
def preference_texts(golden_dir):
  cases = json.loads((golden_dir / "cases.json").read_text())["cases"]
  return {"chosen": [c["stream_text"] for c in cases[:2]], "rejected": [cases[2]["stream_text"]]}


def _upload(local: pathlib.Path, remote: str) -> str:
  for file in local.rglob("*"):
    if file.is_file():
      (epath.Path(remote) / file.relative_to(local).as_posix()).write_bytes(file.read_bytes())
  return remote


def _env(gcs):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(gcs, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return env


def _metrics(workdir: str) -> dict[int, dict]:
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return {}
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  return {row["step"]: row for row in rows if row["split"] == "train"}


def _finetune(workdir, shards, init, steps):
  return [sys.executable, "-m", "notagen_jax.train", f"--config={REPO}/configs/finetune.py:tiny",
          f"--workdir={workdir}", f"--config.data.shards_dir={shards}",
          f"--config.init_checkpoint={init}", "--config.model.patch_length=32",
          "--config.data.batch_size=2", "--config.data.num_threads=0",
          f"--config.train.num_steps={steps}", "--config.train.log_every=1",
          "--config.train.checkpoint_every=10", "--config.train.eval_every=10",
          "--config.optimizer.warmup_steps=5"]


@pytest.mark.slow  # about three minutes: runs in CI's second pass
def test_runs_read_and_write_only_gcs(gcs, corpus_shards, preference_texts, golden_dir,
                                      tmp_path):
  shards = _upload(pathlib.Path(corpus_shards), f"{BUCKET}/data/shards")
  init = f"{BUCKET}/init/tiny.pth"
  epath.Path(init).write_bytes((golden_dir / "tiny.pth").read_bytes())
  env = _env(gcs)
  run = lambda cmd: subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)

  # Fine-tuning, uninterrupted and stopped by SIGTERM then resumed: the same losses.
  steps = 24
  straight, stopped = f"{BUCKET}/runs/straight", f"{BUCKET}/runs/stopped"
  run(_finetune(straight, shards, init, steps))
  process = subprocess.Popen(_finetune(stopped, shards, init, steps), cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and max(_metrics(stopped), default=0) < 3:
    assert process.poll() is None, process.stderr.read()[-3000:]
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 0
  assert max(_metrics(stopped)) < steps
  run(_finetune(stopped, shards, init, steps))
  expected, resumed = _metrics(straight), _metrics(stopped)
  assert sorted(resumed) == sorted(expected) == list(range(1, steps + 1))
  for step in expected:
    assert resumed[step]["loss"] == expected[step]["loss"], step
  runs = epath.Path(stopped)
  assert trainer.final_params_step(runs / trainer.FINAL_PARAMS) == steps
  assert list((runs / "tensorboard").iterdir())
  assert json.loads((runs / "config.json").read_text())["workdir"] == stopped

  # DPO from the .pth on gs:// pairs, then exported from gs:// to a gs:// .pth.
  pairs = f"{BUCKET}/data/pairs.json"
  epath.Path(pairs).write_text(json.dumps(preference_texts))
  dpo = f"{BUCKET}/runs/dpo"
  run([sys.executable, "-m", "notagen_jax.train", f"--config={REPO}/configs/dpo.py:tiny",
       f"--workdir={dpo}", f"--config.init_checkpoint={init}",
       f"--config.data.preference_file={pairs}", "--config.train.num_steps=4",
       "--config.train.checkpoint_every=2", "--config.data.num_threads=0"])
  assert storage.read_json(f"{dpo}/{trainer.REFERENCE_LOGPS}")["chosen"]
  exported = f"{BUCKET}/export/dpo.pth"
  run([sys.executable, "-m", "notagen_jax.port", "to-torch", f"{dpo}/{trainer.FINAL_PARAMS}",
       exported])
  import torch  # pylint: disable=import-outside-toplevel
  (tmp_path / "dpo.pth").write_bytes(epath.Path(exported).read_bytes())
  torch_reference.from_state_dict(torch.load(tmp_path / "dpo.pth", weights_only=True)["model"])

  # Nothing was made locally for a gs:// URL.
  assert not [p for p in tmp_path.rglob("*") if p.name.startswith("gs:")]
  assert not (REPO / "gs:").exists()
