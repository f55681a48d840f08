import json
import math
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from notagen_jax import config as config_lib
from notagen_jax import model as model_lib
from notagen_jax import sharding
from notagen_jax import trainer
from notagen_jax.data import corpus
from notagen_jax.data import pipeline
from notagen_jax.data import preparation
from notagen_jax.data import shards

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(mode, workdir, shards_dir="", **overrides):
  c = config_lib.base_config(mode, "tiny")
  c.workdir = str(workdir)
  c.data.shards_dir = str(shards_dir)
  c.model.patch_length = 64
  c.data.batch_size = 8
  c.data.num_threads = 0
  c.train.num_steps = 1
  c.train.eval_batches = 1
  c.optimizer.warmup_steps = 0
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
  return c


@pytest.fixture(scope="module")
def preference_file(tmp_path_factory, golden_dir):
  cases = json.loads((golden_dir / "cases.json").read_text())["cases"]
  path = tmp_path_factory.mktemp("dpo") / "pairs.json"
  # Generated text carries the stream markers; the golden stream texts are such text.
  path.write_text(json.dumps({"chosen": [c["stream_text"] for c in cases[:2]],
                              "rejected": [cases[2]["stream_text"]]}))
  return path


def _read_metrics(workdir, split="train"):
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
          .splitlines()]
  return {row["step"]: row for row in rows if row["split"] == split}


def test_one_step_pretrain(corpus_shards, tmp_path):
  c = tiny_config("pretrain", tmp_path, corpus_shards)
  batch = next(trainer.make_train_data(c, None))  # the step's batch: the same seed, the same rows
  metrics = trainer.train_and_evaluate(c, str(tmp_path))
  # Target chars: the non-pad chars of every patch whose predecessor is real too.
  pairs = (batch["masks"][:, :-1] & batch["masks"][:, 1:]).astype(bool)
  n_chars = int(((batch["patches"][:, 1:] != 0) & pairs[..., None]).sum())
  assert metrics["n_chars"] == n_chars
  assert metrics["loss"] == pytest.approx(metrics["nll_sum"] / n_chars, rel=1e-6)
  # A fresh model's logits have std ~ 0.02 * sqrt(128) ~ 0.23: its loss is ln 128 + ~0.03.
  assert metrics["loss"] == pytest.approx(np.log(128), abs=0.06)
  flops = 3 * sum(trainer.forward_flops(trainer.model_config(c), int(n))
                  for n in batch["masks"].sum(axis=1) if n > 1)
  assert metrics["flops"] == flops
  # Both throughputs divide by the same step time: their ratio is the FLOPs per target char.
  assert metrics["tflops_per_device"] / metrics["chars_per_s"] == pytest.approx(
      flops / (jax.device_count() * 1e12 * n_chars), rel=1e-9)
  assert metrics["eval_bits_per_char"] == pytest.approx(metrics["eval_loss"] / np.log(2),
                                                        rel=1e-6)
  assert list((tmp_path / "tensorboard").iterdir())
  assert (tmp_path / "checkpoints" / "1").is_dir()
  # The finished run exports to the original's .pth format.
  subprocess.run([sys.executable, "-m", "notagen_jax.port", "to-torch",
                  str(tmp_path / trainer.FINAL_PARAMS), str(tmp_path / "out.pth")], cwd=REPO,
                 env=_env(), check=True, capture_output=True)
  import torch  # pylint: disable=import-outside-toplevel
  state_dict = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
  assert state_dict["patch_level_decoder.base.wpe.weight"].shape == (64, 128)


def test_one_step_finetune_from_original_pth(corpus_shards, tmp_path, golden_dir):
  c = tiny_config("finetune", tmp_path, corpus_shards, init_checkpoint=str(golden_dir / "tiny.pth"))
  metrics = trainer.train_and_evaluate(c, str(tmp_path))
  assert np.isfinite(metrics["loss"])


def test_one_step_dpo(preference_file, tmp_path, golden_dir):
  c = tiny_config("dpo", tmp_path, init_checkpoint=str(golden_dir / "tiny.pth"),
                  **{"data.preference_file": str(preference_file),
                     "data.eval_preference_file": str(preference_file), "data.batch_size": 2,
                     "model.patch_length": 256, "mesh.shape": (2, 1, -1), "model.dropout": 0.0})
  metrics = trainer.train_and_evaluate(c, str(tmp_path))
  # Policy == reference at step 0 (dropout off): the DPO-Positive loss is log 2, up to float
  # rounding of ~1e4-sized log-prob sums (batched vs one by one; an ulp there is 1e-3 nats, which
  # beta = 0.1 scales down and lambda = 10 up). Measured: 8.5e-5 from log 2.
  assert metrics["loss"] == pytest.approx(np.log(2), abs=2e-3)
  reference = json.loads((tmp_path / "reference_logps.json").read_text())
  assert len(reference["chosen"]) == 2 and len(reference["rejected"]) == 1
  # The golden checkpoint's summed log-probs of the chorales (cases.json) are the precomputed
  # values: chorales 0 and 1 chosen, 2 rejected.
  cases = json.loads((golden_dir / "cases.json").read_text())["cases"]
  for logp, case in zip(reference["chosen"] + reference["rejected"], cases):
    assert logp == pytest.approx(case["sum_char_logprob"], rel=1e-6)  # measured: 1.1e-7 at most
  assert {"eval_rewards/accuracy", "eval_rewards/margin", "eval_loss"} <= set(metrics)


def _dpo_cmd(workdir, init, pairs, steps):
  """configs/dpo.py as documented, shortened: several checkpoints, no eval preference file."""
  return [sys.executable, "-m", "notagen_jax.train", "--config=configs/dpo.py:tiny",
          f"--workdir={workdir}", f"--config.init_checkpoint={init}",
          f"--config.data.preference_file={pairs}", f"--config.train.num_steps={steps}",
          "--config.train.checkpoint_every=4", "--config.train.eval_every=4",
          "--config.train.log_every=2", "--config.data.num_threads=0"]


@pytest.mark.slow  # a minute or more: runs in CI's second pass
def test_default_dpo_run_checkpoints_without_eval_data_and_exports(preference_file, tmp_path,
                                                                   golden_dir):
  run = tmp_path / "dpo"
  subprocess.run(_dpo_cmd(run, golden_dir / "tiny.pth", preference_file, 14), cwd=REPO,
                 env=_env(), check=True, capture_output=True)
  assert sorted(_read_metrics(run)) == [2, 4, 6, 8, 10, 12, 14]
  assert trainer.final_params_step(run / trainer.FINAL_PARAMS) == 14
  subprocess.run([sys.executable, "-m", "notagen_jax.port", "to-torch",
                  str(run / trainer.FINAL_PARAMS), str(tmp_path / "dpo.pth")], cwd=REPO,
                 env=_env(), check=True, capture_output=True)
  import torch  # pylint: disable=import-outside-toplevel
  import torch_reference  # pylint: disable=import-outside-toplevel
  state_dict = torch.load(tmp_path / "dpo.pth", weights_only=True)["model"]
  torch_reference.from_state_dict(state_dict)  # load_state_dict(strict=True)

  # Resumed with more steps: the export is redone for the new last step.
  subprocess.run(_dpo_cmd(run, golden_dir / "tiny.pth", preference_file, 18), cwd=REPO,
                 env=_env(), check=True, capture_output=True)
  assert trainer.final_params_step(run / trainer.FINAL_PARAMS) == 18
  assert max(_read_metrics(run)) == 18


def test_reference_logps_are_redone_for_other_pairs(preference_file, tmp_path, golden_dir):
  c = tiny_config("dpo", tmp_path, init_checkpoint=str(golden_dir / "tiny.pth"),
                  **{"data.preference_file": str(preference_file), "data.batch_size": 2,
                     "mesh.shape": (2, 1, -1), "model.dropout": 0.0})
  setup = trainer.build_setup(c)
  eval_step = trainer.make_eval_step(setup)
  out = tmp_path / "reference_logps.json"
  trainer.reference_logps(setup, eval_step, str(preference_file), out)
  first = json.loads(out.read_text())
  out.write_text(json.dumps({**first, "chosen": [0.0, 0.0]}))
  trainer.reference_logps(setup, eval_step, str(preference_file), out)
  assert json.loads(out.read_text())["chosen"] == [0.0, 0.0]  # same inputs: reused
  pairs = json.loads(preference_file.read_text())
  swapped = tmp_path / "swapped.json"
  swapped.write_text(json.dumps({"chosen": pairs["rejected"], "rejected": pairs["chosen"]}))
  trainer.reference_logps(setup, eval_step, str(swapped), out)
  again = json.loads(out.read_text())
  assert again["chosen"] == first["rejected"] and again["rejected"] == first["chosen"]


def test_reference_pass_takes_the_weights_as_arguments(preference_file, tmp_path, golden_dir):
  c = tiny_config("dpo", tmp_path, init_checkpoint=str(golden_dir / "tiny.pth"),
                  **{"data.preference_file": str(preference_file), "data.batch_size": 8,
                     "model.dropout": 0.0})
  setup = trainer.build_setup(c)
  rows = {"patches": jax.ShapeDtypeStruct((16, 64, 16), np.int32),
          "masks": jax.ShapeDtypeStruct((16, 64), np.int32)}
  text = trainer.make_eval_step(setup).lower(setup.state.params, None, rows).as_text()
  # Non-splat constants print their bytes as hex; the smallest weight matrix has H*H floats.
  blobs = [len(b) // 2 for b in re.findall(r'dense<"0x([0-9A-F]+)">', text)]
  assert max(blobs, default=0) < 4 * setup.model_cfg.hidden ** 2


def _loss_and_grads(c, devices, batch):
  setup = trainer.build_setup(c, devices)
  grad_fn = jax.jit(jax.value_and_grad(trainer.make_loss_fn(setup), has_aux=True))
  (loss, _), grads = grad_fn(setup.state.params, setup.reference,
                             sharding.global_batch(batch, setup.mesh), setup.state.rng,
                             setup.state.step)
  as_numpy = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  return as_numpy(setup.state.params), float(loss), as_numpy(grads)


@pytest.mark.parametrize("mode", ["pretrain", pytest.param("dpo", marks=pytest.mark.slow)])
def test_sharded_step_equals_single_device(mode, corpus_shards, preference_file, tmp_path,
                                           golden_dir):
  assert jax.device_count() == 8
  if mode == "dpo":
    c = tiny_config("dpo", tmp_path, init_checkpoint=str(golden_dir / "tiny.pth"),
                    **{"data.preference_file": str(preference_file), "model.dropout": 0.0,
                       "dpo.precompute_reference": False, "data.batch_size": 4,
                       "model.patch_length": 256})
    batch = next(iter(pipeline.preference_dataset(preference_file, batch_size=4,
                                                  patch_length=256, shuffle=False)))
  else:
    c = tiny_config("pretrain", tmp_path, corpus_shards, **{"model.dropout": 0.0})
    batch = next(pipeline.make_iterator(corpus_shards, batch_size=8, patch_length=64,
                                        num_threads=0))
  c.mesh.shape = (1, 1, 1)
  params, loss, grads = _loss_and_grads(c, jax.devices()[:1], batch)
  c.mesh.shape = (2, 2, 2)
  sharded_params, sharded_loss, sharded_grads = _loss_and_grads(c, jax.devices(), batch)
  for a, b in zip(params, sharded_params):
    np.testing.assert_array_equal(a, b)  # the same init, whatever the sharding
  assert sharded_loss == pytest.approx(loss, rel=1e-5)
  scale = max(np.abs(g).max() for g in grads)
  for a, b in zip(grads, sharded_grads):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale)


def _train_cmd(workdir, shards_dir, steps, extra=()):
  return [sys.executable, "-m", "notagen_jax.train", "--config=configs/pretrain.py:tiny",
          f"--workdir={workdir}", f"--config.data.shards_dir={shards_dir}",
          "--config.model.patch_length=32", "--config.data.batch_size=2",
          "--config.data.num_threads=0", f"--config.train.num_steps={steps}",
          "--config.train.log_every=1", "--config.train.checkpoint_every=20",
          "--config.train.eval_every=1000", "--config.optimizer.warmup_steps=5", *extra]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", **extra)
  return env


@pytest.mark.slow  # a minute or more: runs in CI's second pass
def test_resume_after_sigkill_equals_uninterrupted(corpus_shards, tmp_path):
  steps = 60
  straight = tmp_path / "straight"
  subprocess.run(_train_cmd(straight, corpus_shards, steps), cwd=REPO, env=_env(), check=True,
                 capture_output=True)
  killed = tmp_path / "killed"
  process = subprocess.Popen(_train_cmd(killed, corpus_shards, steps), cwd=REPO, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline:
    logged = _read_metrics(killed) if (killed / "metrics.jsonl").exists() else {}
    if max(logged, default=0) >= 25 and (killed / "checkpoints" / "20").is_dir():
      break
    assert process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert max(_read_metrics(killed)) < steps
  subprocess.run(_train_cmd(killed, corpus_shards, steps), cwd=REPO, env=_env(), check=True,
                 capture_output=True)
  expected, resumed = _read_metrics(straight), _read_metrics(killed)
  assert sorted(expected) == list(range(1, steps + 1))
  for step in range(21, steps + 1):
    assert resumed[step]["loss"] == expected[step]["loss"], step


@pytest.mark.slow  # a minute or more: runs in CI's second pass
def test_sigterm_saves_and_exits_cleanly(corpus_shards, tmp_path):
  process = subprocess.Popen(_train_cmd(tmp_path, corpus_shards, 100_000), cwd=REPO, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
    time.sleep(0.1)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 0
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved and max(saved) >= max(_read_metrics(tmp_path))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # about a minute: runs in CI's second pass
def test_two_processes_agree_with_one(tmp_path):
  # Eight pieces and a global batch of eight: every step sees all of them, however split.
  sources = [s for s in corpus.music21_sources() if s.path.endswith(".mxl")
             and "/bach/bwv" in s.path][:8]
  preparation.prepare_corpus(sources, tmp_path / "prepared",
                             preparation.PrepareOptions(eval_fraction=0.0, workers=1))
  shards_dir = shards.build_shards(tmp_path / "prepared", tmp_path / "shards")
  extra = ["--config.data.batch_size=8", "--config.data.key_sampling=original",
           "--config.data.stream_cut=False", "--config.model.dropout=0.0"]
  one = tmp_path / "one"
  subprocess.run(_train_cmd(one, shards_dir, 3, extra), cwd=REPO, env=_env(), check=True,
                 capture_output=True)
  port = _free_port()
  two = tmp_path / "two"
  processes = [subprocess.Popen(
      _train_cmd(two, shards_dir, 3, extra + [
          f"--config.distributed.coordinator_address=localhost:{port}",
          "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]),
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  for process in processes:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
  expected, got = _read_metrics(one), _read_metrics(two)
  assert sorted(got) == [1, 2, 3]
  for step in got:
    assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5)


def test_missing_shards_dir_is_one_clear_error(tmp_path):
  c = tiny_config("pretrain", tmp_path, tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.data.shards_dir"):
    trainer.train_and_evaluate(c, str(tmp_path))


def test_init_checkpoint_of_another_size(corpus_shards, tmp_path, golden_dir):
  c = tiny_config("finetune", tmp_path, corpus_shards, init_checkpoint=str(golden_dir / "tiny.pth"))
  c.model.size = "small"
  c.model.patch_length = 64
  with pytest.raises(ValueError, match="size 'small': patch_layers is 2, config has 12.*hidden is 128, config has 768"):
    trainer.train_and_evaluate(c, str(tmp_path))


def test_bad_preference_files(tmp_path, golden_dir):
  c = tiny_config("dpo", tmp_path, init_checkpoint=str(golden_dir / "tiny.pth"),
                  **{"data.preference_file": str(tmp_path / "missing.json")})
  with pytest.raises(FileNotFoundError, match="config.data.preference_file"):
    trainer.train_and_evaluate(c, str(tmp_path))
  empty = tmp_path / "empty.json"
  empty.write_text(json.dumps({"chosen": ["%a\n[r:0/0][V:1]abc|\n"], "rejected": []}))
  c.data.preference_file = str(empty)
  with pytest.raises(ValueError, match="has 1 and 0"):
    trainer.train_and_evaluate(c, str(tmp_path))


def test_wrong_config_value_names_the_field(tmp_path):
  c = tiny_config("pretrain", tmp_path, tmp_path)
  c.optimizer.schedule = "linear"
  with pytest.raises(ValueError, match="config.optimizer.schedule"):
    config_lib.validate(c)
  c = tiny_config("pretrain", tmp_path, tmp_path)
  c.mesh.logical_axis_rules = (("embed", "model"),)
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    config_lib.validate(c)


def test_dpo_policy_dropout_needs_reference_dropout(tmp_path):
  c = config_lib.base_config("dpo", "tiny")
  c.workdir, c.data.preference_file, c.init_checkpoint = str(tmp_path), "pairs.json", "policy"
  config_lib.validate(c)  # the default: no dropout in either
  c.model.dropout = 0.1
  with pytest.raises(ValueError, match="config.model.dropout"):
    config_lib.validate(c)
  c.dpo.precompute_reference, c.dpo.reference_dropout = False, True  # the original's way
  config_lib.validate(c)


@pytest.mark.parametrize("policy", ["stop", pytest.param("skip", marks=pytest.mark.slow)])
def test_non_finite_loss(policy, corpus_shards, tmp_path):
  c = tiny_config("pretrain", tmp_path, corpus_shards,
                  **{"optimizer.learning_rate": 1e30, "train.num_steps": 4,
                     "train.nan_policy": policy, "train.max_nan_skips": 100})
  if policy == "stop":
    with pytest.raises(trainer.NonFiniteLoss, match="stopping"):
      trainer.train_and_evaluate(c, str(tmp_path))
  else:
    metrics = trainer.train_and_evaluate(c, str(tmp_path))
    # Step 1's loss is finite and its update (lr 1e30) ruins the weights; steps 2-4 are skipped
    # (the weights stay as they are, so each is non-finite again), and the run goes on to the end.
    assert metrics["finite"] == 0.25
    assert max(_read_metrics(tmp_path)) == 4


def test_mesh_shape_resolution():
  assert sharding.mesh_shape((1, -1, 1), 8) == (1, 8, 1)
  assert sharding.mesh_shape((2, 2, -1), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.mesh_shape((3, -1, 1), 8)


def _matmul_flops(jaxpr) -> int:
  """2 * M * N * K over every dot_general of a jaxpr, inner jaxprs included (a scan's times its
  length)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
    repeat = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for param in eqn.params.values():
      for inner in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(inner, jax.extend.core.ClosedJaxpr):
          total += repeat * _matmul_flops(inner.jaxpr)
        elif isinstance(inner, jax.extend.core.Jaxpr):
          total += repeat * _matmul_flops(inner)
  return total


def _hand_count(cfg, n_patches):
  """The forward's matmuls from the architecture: a layer over t tokens multiplies by its q, k, v,
  output (4 H^2) and MLP (8 H^2) weights, and runs Q K^T and A V over t x t (2 * 2 t^2 H). The
  patch level embeds each patch with a (16 * 128) x H Linear; the char level runs 16 positions
  per pair of patches (the original's 17th predicts nothing and is not computed) and a tied
  H x 128 head."""
  h, p = cfg.hidden, cfg.patch_size
  layer = lambda t: 2 * t * 12 * h * h + 2 * 2 * t * t * h
  patch_level = 2 * n_patches * p * cfg.vocab * h + cfg.patch_layers * layer(n_patches)
  char_level = (n_patches - 1) * (cfg.char_layers * layer(p) + 2 * p * h * cfg.vocab)
  return patch_level + char_level


@pytest.mark.parametrize("size,n_patches", [("tiny", 64), ("small", 2048), ("large", 1024)])
def test_forward_flops_are_the_matmuls_the_forward_runs(size, n_patches):
  cfg = trainer.model_config(config_lib.base_config("pretrain", size))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.create(cfg)))
  jaxpr = jax.make_jaxpr(
      lambda state, patches, mask: model_lib.forward(nnx.merge(graphdef, state), patches,
                                                     mask).char_logprob)(
          state, jax.ShapeDtypeStruct((1, n_patches, 16), np.int32),
          jax.ShapeDtypeStruct((1, n_patches), np.int32))
  # The char decoder reads its wte [128, H] and wpe [17, H] tables as one-hot matmuls; those
  # are table reads, not model FLOPs, in the original and in the count.
  lookups = 2 * (n_patches - 1) * cfg.patch_size * (cfg.vocab + cfg.patch_size + 1) * cfg.hidden
  counted = _matmul_flops(jaxpr.jaxpr) - lookups
  assert counted == _hand_count(cfg, n_patches)
  assert trainer.forward_flops(cfg, n_patches) == counted


@pytest.mark.slow  # a minute or more: runs in CI's second pass
def test_fsdp_mesh_splits_activations_by_batch():
  """Weights sharded over fsdp must not pull the activations along: each device keeps its rows."""
  from notagen_jax import planning  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config("pretrain", "tiny")
  c.data.batch_size = 8
  c.model.patch_length = 128
  cpu = planning.topology("cpu")
  data_parallel = planning.compile_step(c, (8, 1, 1), cpu).memory["temp"]
  fully_sharded = planning.compile_step(c, (1, 8, 1), cpu).memory["temp"]
  assert fully_sharded < 1.25 * data_parallel


@pytest.mark.slow  # about a minute: runs in CI's second pass
def test_resume_on_a_different_mesh(corpus_shards, tmp_path):
  c = tiny_config("pretrain", tmp_path, corpus_shards, **{"mesh.shape": (2, 2, 2)})
  trainer.train_and_evaluate(c, str(tmp_path))
  c.mesh.shape = (1, -1, 1)
  c.train.num_steps = 2
  metrics = trainer.train_and_evaluate(c, str(tmp_path))
  assert sorted(_read_metrics(tmp_path)) == [1, 2] and np.isfinite(metrics["loss"])


def test_gradient_accumulation_updates_every_k_steps():
  c = config_lib.base_config("pretrain", "tiny")
  c.optimizer.grad_accum_steps = 2
  c.optimizer.warmup_steps = 0
  tx, _ = trainer.make_optimizer(c)
  params = {"w": np.ones((2, 2), np.float32)}
  grads = {"w": np.full((2, 2), 0.5, np.float32)}
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  assert not np.any(np.asarray(updates["w"]))  # first micro-step: accumulated only
  updates, state = tx.update(grads, state, params)
  # Second: one AdamW step on the mean gradient. Adam's first step is g / (|g| + eps), whatever
  # the size of g, plus the decoupled weight decay on the weight (1.0). (Up to float32: 1 - b2
  # with b2 = 0.999 in float32 is 1.3e-5 off, which the square root halves.)
  o = c.optimizer
  np.testing.assert_allclose(updates["w"], -o.learning_rate * (0.5 / (0.5 + o.eps)
                                                               + o.weight_decay), rtol=1e-5)


def _applied_learning_rates(k, num_steps, warmup):
  """The learning rate of each AdamW update of a run of num_steps train steps under k-step
  accumulation: with a constant gradient, no decay and eps ~0, Adam's step is exactly lr."""
  c = config_lib.base_config("pretrain", "tiny")
  c.optimizer.update(grad_accum_steps=k, warmup_steps=warmup, schedule="cosine",
                     weight_decay=0.0, eps=1e-30, learning_rate=1.0)
  c.train.num_steps = num_steps
  tx, schedule = trainer.make_optimizer(c)
  params, grads = {"w": np.zeros(1, np.float32)}, {"w": np.ones(1, np.float32)}
  state, rates = tx.init(params), []
  for step in range(num_steps):
    updates, state = tx.update(grads, state, params)
    if (step + 1) % k == 0:
      rates.append((-float(updates["w"][0]), float(schedule(step))))
  return rates


def test_accumulated_cosine_ends_where_the_schedule_ends():
  plain = _applied_learning_rates(1, 10, 2)
  accumulated = _applied_learning_rates(4, 40, 8)
  # Ten updates either way, each at the same point of the same cosine; the logged rate is the
  # applied one.
  assert len(accumulated) == 10
  np.testing.assert_allclose([r for r, _ in accumulated], [r for r, _ in plain], rtol=1e-5)
  # (Adam's float32 bias corrections round the applied rate by ~1e-5.)
  np.testing.assert_allclose([r for r, _ in accumulated], [s for _, s in accumulated], rtol=1e-4)
  # The last update is the cosine's last step before 0 (1/2 (1 + cos(pi 7/8)) of the peak).
  assert accumulated[-1][0] == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)), rel=1e-4)


def test_no_weight_decay_on_biases_and_layer_norms():
  c = config_lib.base_config("pretrain", "tiny")
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from notagen_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  abstract = nnx.eval_shape(lambda: model_lib.NotaGen(trainer.model_config(c), nnx.Rngs(0)))
  _, params, _ = nnx.split(abstract, nnx.Param, ...)
  mask = trainer._decay_mask(params)  # pylint: disable=protected-access
  decayed = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
  assert any("fc'" in k for k in decayed) and any("wte" in k for k in decayed)
  assert not any("bias" in k or "ln" in k for k in decayed)


def test_char_packing_in_the_trainer_keeps_the_loss(corpus_shards, tmp_path):
  losses = {}
  for packing in (False, True):
    c = tiny_config("pretrain", tmp_path / str(packing), corpus_shards,
                    **{"model.dropout": 0.0, "model.char_packing": packing, "train.num_steps": 2})
    trainer.train_and_evaluate(c, c.workdir)
    losses[packing] = [row["loss"] for _, row in sorted(_read_metrics(c.workdir).items())]
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_packed_length_is_bucketed(tmp_path):
  c = tiny_config("pretrain", tmp_path, **{"model.char_packing": True, "model.patch_length": 256})
  cfg = trainer.model_config(c)
  fake = trainer.Setup(c, None, cfg, None, None, None, None, None, None, None)
  patches = np.zeros((2, 256, 16), np.int32)
  masks = np.zeros((2, 256), np.int32)
  patches[:, :10, :3] = 65
  masks[:, :10] = 1
  length = trainer.packed_length(fake, {"patches": patches, "masks": masks})
  # The few real chars fit in the first bucket: 1/8 of the 255 * 16 slots, rounded up to 64s.
  assert length == 512


def test_step_flops_count_real_patches_only():
  c = config_lib.base_config("pretrain", "tiny")
  cfg = trainer.model_config(c)
  fake = trainer.Setup(c, None, cfg, None, None, None, None, None, None, None)
  masks = np.zeros((2, 256), np.int32)
  masks[0, :10] = 1
  assert trainer.step_flops(fake, {"masks": masks}) == 3 * trainer.forward_flops(cfg, 10)
