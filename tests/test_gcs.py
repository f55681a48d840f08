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
import test_dpo_loop
import torch_reference
from notagen_jax import generation
from notagen_jax import sampling
from notagen_jax import storage
from notagen_jax import trainer
from notagen_jax.data import corpus
from notagen_jax.data import pipeline
from notagen_jax.data import shards as shards_lib

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


def _no_local_gs(tmp_path):
  """Nothing was made locally for a gs:// URL."""
  assert not [p for p in tmp_path.rglob("*") if p.name.startswith("gs:")]
  assert not (REPO / "gs:").exists()


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

  _no_local_gs(tmp_path)


CHORALES = ("bwv1.6.mxl", "bwv10.7.mxl", "bwv101.7.mxl", "bwv102.7.mxl", "bwv281.krn")
PROMPT = ("Baroque", "Bach, Johann Sebastian", "Choral")

# The real clamp_dpo entry point with test_dpo_loop's fake sampler (real chorales and broken
# texts): a tiny random model's pieces would give no preference pairs. argv[1]: the bodies.
_CLAMP_DPO_FAKE_SAMPLER = """
import json, random, runpy, sys
from notagen_jax import sampling
bodies = json.loads(open(sys.argv.pop(1)).read())

def run(self, prompts, seed=0, on_result=None, header=None, indices=None, on_patches=None):
  results = []
  for i, prompt in zip(indices or range(len(prompts)), prompts):
    rng = random.Random(seed * 1000 + i)
    body = rng.choice(bodies) if i % 4 else "[r:0/0]zz|\\n" * 3
    results.append(sampling.Result(i, prompt, prompt + body, True, "", 10, 0, 0.1))
    on_result(results[-1])
  return results

sampling.Sampler.run = run
runpy.run_module("notagen_jax.clamp_dpo", run_name="__main__")
"""


def _files(folder: str) -> set[str]:
  return {p.relative_to(epath.Path(folder)).as_posix() for p in storage.files_under(folder)}


@pytest.mark.slow  # about two minutes: runs in CI's second pass
def test_entry_points_read_and_write_only_gcs(gcs, golden_dir, tmp_path):
  """prepare, tokenize, loglik, generate and clamp_dpo, every path a gs:// URL."""
  root = f"{BUCKET}/entry"
  scores = f"{root}/scores"
  for name in CHORALES:
    epath.Path(f"{scores}/{name}").write_bytes(
        (corpus.music21_corpus_root() / "bach" / name).read_bytes())
  epath.Path(f"{scores}/index.csv").write_text("path,period,composer,instrumentation\n" + "".join(
      f'{name},{PROMPT[0]},"{PROMPT[1]}",{PROMPT[2]}\n' for name in CHORALES))
  init = f"{root}/init/tiny.pth"
  epath.Path(init).write_bytes((golden_dir / "tiny.pth").read_bytes())
  env = _env(gcs)

  def run(cmd):
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout

  # prepare: scores (MusicXML and Humdrum) and index read from gs://, pieces and shards written
  # there (the shards built locally, then uploaded); they load, and a second build reuses them.
  prepared = f"{root}/prepared"
  out = run([sys.executable, "-m", "notagen_jax.prepare", f"--input={scores}",
             f"--index={scores}/index.csv", f"--output={prepared}", "--workers=2",
             "--eval_fraction=0"])
  assert f"prepared {len(CHORALES)} of {len(CHORALES)} pieces" in out
  shards_dir = out.split("shards: ")[1].strip()
  assert shards_dir == f"{prepared}/shards/notagen_shards/p16_prompt/1.0.0"
  assert {"report.json", "index.jsonl", "dataset_info.json"} <= {
      name.rsplit("/", 1)[-1] for name in _files(prepared)}
  records = [json.loads(p.read_text()) for p in storage.files_under(f"{prepared}/pieces")]
  assert {tuple(r[f] for f in corpus.PROMPT_FIELDS) for r in records} == {PROMPT}
  source = shards_lib.open_split(shards_dir)
  assert sorted(source[i]["piece_id"].decode() for i in range(len(source))) == sorted(
      r["piece_id"] for r in records)
  batch = next(pipeline.make_iterator(shards_dir, batch_size=2, patch_length=256,
                                      shuffle=False, num_threads=0))
  assert batch["masks"].sum() > 0
  assert str(shards_lib.build_shards(prepared, f"{prepared}/shards")) == shards_dir

  # tokenize and loglik on gs:// ABC files, loglik's lines written to gs:// too.
  abcs = sorted(str(p) for p in storage.files_under(f"{prepared}/interleaved"))[:2]
  assert json.loads(run([sys.executable, "-m", "notagen_jax.tokenize", abcs[0],
                         "--patch_length=256"]))
  scored = f"{root}/loglik.jsonl"
  run([sys.executable, "-m", "notagen_jax.loglik", f"--checkpoint={init}", f"--output={scored}",
       *abcs])
  rows = [json.loads(line) for line in epath.Path(scored).read_text().splitlines()]
  assert [row["file"] for row in rows] == abcs and all(row["n_chars"] > 0 for row in rows)

  # generate: a gs:// MusicXML continued, the prompt checked against the gs:// corpus, every
  # piece written to gs://. A real piece's MusicXML and MIDI go there too (music21 writes MIDI
  # only to local files).
  pieces = f"{root}/generated"
  run([sys.executable, "-m", "notagen_jax.generate", f"--checkpoint={init}", f"--output={pieces}",
       *(f"--{f}={v}" for f, v in zip(corpus.PROMPT_FIELDS, PROMPT)), f"--known_prompts={prepared}",
       f"--continue_from={scores}/{CHORALES[0]}", "--bars=2", "--num_pieces=2", "--batch=2",
       "--max_patches=4"])
  written = [json.loads(line) for line in (epath.Path(pieces) / "pieces.jsonl").read_text()
             .splitlines()]
  assert sorted(w["index"] for w in written) == [0, 1]
  assert {f"piece_0000{i}.abc" for i in (0, 1)} <= _files(pieces)
  assert all(epath.Path(f).exists() for w in written for f in w["files"].values())
  text = json.loads((golden_dir / "cases.json").read_text())["cases"][0]["stream_text"]
  real = generation.write_piece(sampling.Result(0, "", text, True, "", 10, 0, 1.0), pieces, "real")
  assert real.errors == {} and epath.Path(real.files["mid"]).read_bytes()[:4] == b"MThd"

  # clamp_dpo: one iteration (samples, scores, pairs, a 2-step DPO, the trained policy's
  # samples) in a gs:// workdir, from the gs:// checkpoint and prepared corpus.
  bodies = tmp_path / "bodies.json"
  with_markers = test_dpo_loop._with_markers  # pylint: disable=protected-access
  bodies.write_text(json.dumps([with_markers(r["augmented"][key]) for r in records
                                for key in ("C", "G")]))
  dpo = f"{root}/clamp_dpo"
  run([sys.executable, "-c", _CLAMP_DPO_FAKE_SAMPLER, str(bodies),
       f"--config={REPO}/configs/clamp_dpo.py:quickstart", f"--workdir={dpo}",
       f"--config.init_checkpoint={init}", f"--config.ground_truth.prepared_dir={prepared}",
       "--config.iterations=1", "--config.sample.num_pieces=8", "--config.sample.batch=4",
       "--config.select.fraction=0.25", "--config.scorer.workers=1",
       "--config.train.train.num_steps=2"])
  done = _files(dpo)
  assert {"config.json", "summary.json", "summary.txt", "score.png",
          "iteration_0/preferences.json", "iteration_0/scores.json",
          "iteration_0/samples/samples.json", "iteration_1/samples/samples.json"} <= done
  assert trainer.final_params_step(f"{dpo}/iteration_0/train/{trainer.FINAL_PARAMS}") == 2
  summary = json.loads(epath.Path(f"{dpo}/summary.json").read_text())
  assert [r["iteration"] for r in summary] == [0, 1]

  _no_local_gs(tmp_path)


@pytest.mark.slow  # starts the emulator: runs in CI's second pass
def test_clamp2_checkpoint_from_gcs(gcs, golden_dir):
  from notagen_jax.scoring import clamp2  # pylint: disable=import-outside-toplevel
  remote = f"{BUCKET}/clamp2/clamp2_tiny.pth"
  epath.Path(remote).write_bytes((golden_dir / "clamp2_tiny.pth").read_bytes())
  local, loaded = (clamp2.load_state_dict(golden_dir / "clamp2_tiny.pth"),
                   clamp2.load_state_dict(remote))
  assert local.keys() == loaded.keys()
  assert all((local[k] == loaded[k]).all() for k in local)
