"""Checkpoint porting: name map, round trips, errors, the entry points, optimizer state."""

import copy
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import torch_reference
from notagen_jax import checkpoint
from notagen_jax import config as config_lib
from notagen_jax import loglik
from notagen_jax import model as model_lib
from notagen_jax import port
from notagen_jax import sharding
from notagen_jax import torch_port
from notagen_jax import trainer
from notagen_jax.data import pipeline
from notagen_jax.data import shards


@pytest.fixture(scope="module")
def original(golden_dir):
  return torch.load(golden_dir / "tiny.pth", weights_only=True)["model"]


@pytest.fixture(scope="module")
def ported(golden_dir, tmp_path_factory):
  """from-torch then to-torch through the entry point."""
  out = tmp_path_factory.mktemp("port")
  port.main(["from-torch", str(golden_dir / "tiny.pth"), str(out / "ckpt")])
  port.main(["to-torch", str(out / "ckpt"), str(out / "tiny.pth"),
             "--safetensors", str(out / "tiny.safetensors")])
  return out


def _keys(path):
  return [(key, tuple(json.loads(shape)), dtype)
          for key, shape, dtype in (line.split("\t") for line in path.read_text().splitlines())]


def test_round_trip_is_bit_identical(original, ported):
  exported = torch.load(ported / "tiny.pth", weights_only=True)
  # What the original's train-gen.py reads of a pretrained checkpoint; no run: its start values.
  assert list(exported) == ["model", "epoch", "best_epoch", "min_eval_loss"]
  assert (exported["epoch"], exported["best_epoch"], exported["min_eval_loss"]) == (0, 0, 100.0)
  exported = exported["model"]
  assert list(exported) == list(original)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype == torch.float32, key
    assert torch.equal(exported[key], value), key
  # As in the original's files, the head shares the embedding's storage.
  assert (exported[torch_port.LM_HEAD].data_ptr()
          == exported[torch_port.CHAR_WTE].data_ptr())
  from_safetensors = torch_port.load_state_dict(ported / "tiny.safetensors")
  assert sorted(from_safetensors) == sorted(original)  # safetensors keeps no key order
  for key, value in original.items():
    np.testing.assert_array_equal(from_safetensors[key], value.numpy())


def test_checkpoint_directory_and_torch_files_load_the_same(golden_dir, ported):
  params = lambda m: nnx.to_pure_dict(nnx.state(m))
  from_dir = checkpoint.load_model(ported / "ckpt")
  assert from_dir.cfg == model_lib.config_for("tiny")
  for other in (checkpoint.load_model(golden_dir / "tiny.pth"),
                checkpoint.load_model(ported / "tiny.safetensors")):
    assert other.cfg == from_dir.cfg
    jax.tree.map(np.testing.assert_array_equal, params(other), params(from_dir))
  assert checkpoint.load_model(ported / "ckpt", dtype="bfloat16").cfg.dtype == "bfloat16"


def test_bare_state_dict_pth(original, tmp_path):
  torch.save(dict(original), tmp_path / "bare.pth")
  model = checkpoint.load_model(tmp_path / "bare.pth")
  np.testing.assert_array_equal(np.asarray(model.char.wte[...]),
                                original[torch_port.CHAR_WTE].numpy())


def test_exported_jax_model_loads_strict_into_reference(golden_dir, tmp_path):
  # Weights changed on the JAX side (the export must carry them, not the file they came from).
  golden = checkpoint.load_model(golden_dir / "tiny.pth")
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: np.asarray(x) * 1.5 + 0.02 * rng.standard_normal(x.shape),
                        nnx.to_pure_dict(nnx.state(golden)))
  model = checkpoint.build(golden.cfg, params)
  torch_port.save_pth(checkpoint.export_state_dict(model), tmp_path / "changed.pth")
  state_dict = torch.load(tmp_path / "changed.pth", weights_only=True)["model"]
  reference = torch_reference.from_state_dict(state_dict)  # load_state_dict(strict=True)
  case = json.loads((golden_dir / "cases.json").read_text())["cases"][1]
  patches = np.asarray(case["patch_ids"], np.int32)[None, :64]
  mask = np.ones((1, 64), np.int32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(patches).long(), torch.from_numpy(mask).long())
  out = nnx.jit(model_lib.forward)(model, patches, mask)
  np.testing.assert_allclose(out.loss, expected["loss"].item(), rtol=2e-6)
  np.testing.assert_allclose(out.sum_logprob[0], expected["sum_logprob"].item(), rtol=2e-6)
  assert abs(float(out.loss) - case["loss"]) > 0.1  # the changed weights, not the file's


def test_size_inferred_from_shapes(golden_dir):
  keys = _keys(golden_dir / "keys_small.txt")
  shapes = {key: np.zeros(shape, np.float32) for key, shape, _ in keys}
  cfg = torch_port.config_from_state_dict(shapes)
  assert cfg == model_lib.config_for("small")
  assert list(torch_port.torch_shapes(cfg).items()) == [(k, s) for k, s, _ in keys]
  tiny = _keys(golden_dir / "keys.txt")
  assert list(torch_port.torch_shapes(model_lib.config_for("tiny")).items()) == [
      (k, s) for k, s, _ in tiny]
  assert {dtype for _, _, dtype in keys + tiny} == {"float32"}


def test_every_bad_key_is_named(original):
  state_dict = {key: value.numpy() for key, value in original.items()}
  del state_dict["patch_level_decoder.base.h.1.mlp.c_fc.bias"]
  del state_dict["char_level_decoder.base.transformer.ln_f.weight"]
  state_dict["char_level_decoder.base.transformer.h.0.attn.bias"] = np.zeros((1, 1, 17, 17))
  state_dict["patch_level_decoder.base.wpe.weight"] = np.zeros((256, 64), np.float32)
  state_dict["char_level_decoder.base.transformer.h.0.attn.c_attn.weight"] = np.zeros((128, 128))
  with pytest.raises(ValueError) as error:
    torch_port.params_from_state_dict(state_dict, model_lib.config_for("tiny"))
  message = str(error.value)
  for key in ("missing patch_level_decoder.base.h.1.mlp.c_fc.bias",
              "missing char_level_decoder.base.transformer.ln_f.weight",
              "unexpected char_level_decoder.base.transformer.h.0.attn.bias",
              "shape of patch_level_decoder.base.wpe.weight",
              "shape of char_level_decoder.base.transformer.h.0.attn.c_attn.weight"):
    assert key in message, message


def test_missing_layer_and_untied_head_are_errors(original):
  state_dict = {key: value.numpy() for key, value in original.items()
                if not key.startswith("patch_level_decoder.base.h.0.")}
  with pytest.raises(ValueError, match=r"missing patch_level_decoder\.base\.h\.0\.ln_1\.weight"):
    torch_port.params_from_state_dict(state_dict)
  untied = {key: value.numpy() for key, value in original.items()}
  untied[torch_port.LM_HEAD] = untied[torch_port.LM_HEAD] + 1.0
  with pytest.raises(ValueError, match="tied"):
    torch_port.params_from_state_dict(untied)


def test_loglik_entry_point(golden_dir, tmp_path, capsys):
  cases = json.loads((golden_dir / "cases.json").read_text())["cases"]
  paths = []
  for case in cases[1:]:
    paths.append(tmp_path / f"{case['name']}.abc")
    paths[-1].write_text(case["input_text"])
  loglik.main([f"--checkpoint={golden_dir / 'tiny.pth'}"] + [str(p) for p in paths])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [line["file"] for line in lines] == [str(p) for p in paths]
  for line, case in zip(lines, cases[1:]):
    assert line["n_patches"] == case["n_patches"]
    assert line["n_chars"] == case["n_target_chars"]
    # Float32 rounding only, as in tests/test_model.py.
    np.testing.assert_allclose(line["mean_nll"], case["loss"], rtol=2e-6)
    np.testing.assert_allclose(line["sum_logprob"], case["sum_char_logprob"], rtol=2e-6)


# A run whose optimizer state has everything make_optimizer can put there: clipping (binding),
# accumulation over 2 train steps, a warmup still under way, and weight decay.
RUN_STEPS, ACCUM, WARMUP_UPDATES, CLIP = 4, 2, 5, 0.1


@pytest.fixture(scope="module")
def trained_run(corpus_shards, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  c = config_lib.base_config("pretrain", "tiny")
  c.data.shards_dir = str(corpus_shards)
  c.data.num_threads = 0
  c.model.patch_length = 64
  c.model.dropout = 0.0  # both sides deterministic
  c.train.num_steps = RUN_STEPS
  c.train.eval_every = c.train.checkpoint_every = 2
  c.train.eval_batches = 1
  c.optimizer.grad_accum_steps = ACCUM
  c.optimizer.warmup_steps = WARMUP_UPDATES * ACCUM
  c.optimizer.clip_norm = CLIP
  trainer.train_and_evaluate(c, str(workdir))
  port.main(["to-torch", str(workdir), str(workdir / "resume.pth"), "--optimizer_state"])
  return workdir


def _batches(run, n):
  c = run.config
  ds = pipeline.make_dataset(c.data.shards_dir, batch_size=c.data.batch_size,
                             patch_length=c.model.patch_length, key_sampling="original",
                             stream_cut=False, shuffle=False, num_threads=0)
  return [batch for _, batch in zip(range(n), ds)]


def _decays(key):
  """Whether our AdamW decays this tensor (trainer._decay_mask: not biases, not LayerNorms)."""
  return not (key.endswith(".bias") or ".ln_" in key)


def test_exported_optimizer_resumes_as_our_next_update(trained_run):
  run = port.find_run(trained_run)
  assert run.step == RUN_STEPS
  c, cfg = run.config, trainer.model_config(run.config)
  batches = _batches(run, ACCUM)

  # Our next update: ACCUM train steps from the restored state, on the run's mesh.
  setup = trainer.build_setup(c)
  state = port.restore_train_state(run)
  old = torch_port.torch_layout(nnx.to_pure_dict(state.params), cfg)
  state = jax.device_put(state, setup.state_shardings)
  train_step = trainer.make_train_step(setup)  # donates the state
  for batch in batches:
    state, _ = train_step(state, None, sharding.global_batch(batch, setup.mesh))
  ours = torch_port.torch_layout(nnx.to_pure_dict(state.params), cfg)

  # The same update in torch, built and stepped as the original's train-gen.py (with RL/train.py's
  # clip), the scheduler attached to the optimizer it drives.
  saved = torch.load(trained_run / "resume.pth", map_location="cpu")
  model = torch_reference.from_state_dict(saved["model"])  # strict; eval(): no dropout
  optimizer = torch.optim.AdamW(model.parameters(), lr=c.optimizer.learning_rate)
  lr_sched = transformers.get_constant_schedule_with_warmup(optimizer, WARMUP_UPDATES)
  optimizer.load_state_dict(saved["optimizer"])
  lr_sched.load_state_dict(saved["lr_sched"])
  lr = optimizer.param_groups[0]["lr"]
  assert lr == pytest.approx(float(setup.schedule(RUN_STEPS)))
  for batch in batches:
    loss = model(torch.from_numpy(batch["patches"]).long(),
                 torch.from_numpy(batch["masks"]).long())["loss"]
    (loss / ACCUM).backward()
  assert torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP) > CLIP  # the clip binds
  optimizer.step()
  lr_sched.step()
  assert lr_sched.get_last_lr()[0] == pytest.approx(float(setup.schedule(RUN_STEPS + ACCUM)))

  # torch's single param group decays biases and LayerNorms too, which ours does not: by
  # exactly lr * weight_decay * the old weight.
  wd = c.optimizer.weight_decay
  theirs = dict(model.named_parameters())
  worst = 0.0
  for key, value in ours.items():
    expected = value if _decays(key) else value - lr * wd * old[key]
    got = theirs[key].detach().numpy()
    worst = max(worst, float(np.max(np.abs(got - expected))) / lr)
    # Up to float32 rounding of the weights (an ulp of 1.0 is 1.5e-3 lr here).
    np.testing.assert_allclose(got, expected, rtol=3e-7, atol=1e-3 * lr, err_msg=key)
  print(f"largest difference: {worst:.2e} x lr")

  # And the moments after the update, through the same export.
  after = port.optimizer_state(run, state)["optimizer"]["state"]
  for i, key in enumerate(torch_port.parameter_keys(cfg)):
    if key not in ours:
      assert i not in optimizer.state_dict()["state"]  # the unused wte: no gradient, no state
      continue
    torch_state = optimizer.state_dict()["state"][i]
    assert torch_state["step"].item() == after[i]["step"].item() == RUN_STEPS // ACCUM + 1
    for moment in ("exp_avg", "exp_avg_sq"):
      np.testing.assert_allclose(torch_state[moment].numpy(), after[i][moment].numpy(),
                                 rtol=1e-4, atol=1e-6 * float(after[i][moment].abs().max()),
                                 err_msg=f"{key} {moment}")


def test_original_train_gen_loads_the_exports(trained_run, capsys):
  """train-gen.py's two loading paths, line for line: the pretrained checkpoint (fine-tuning's
  start) and LOAD_FROM_CHECKPOINT's resume."""
  port.main(["to-torch", str(trained_run / trainer.FINAL_PARAMS),
             str(trained_run / "final.pth")])
  run = port.find_run(trained_run)
  n_train = len(shards.open_split(run.config.data.shards_dir, "train"))
  epoch_at = lambda step: step * run.config.data.batch_size // n_train
  evals = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
  best = min((row for row in evals if row["split"] == "eval"), key=lambda row: row["loss"])

  saved = torch.load(trained_run / "resume.pth", weights_only=True)
  assert list(saved) == ["model", "optimizer", "lr_sched", "epoch", "best_epoch", "min_eval_loss"]
  assert saved["epoch"] == epoch_at(RUN_STEPS) > 0
  assert saved["best_epoch"] == epoch_at(best["step"])
  assert saved["min_eval_loss"] == best["loss"]

  cfg = trainer.model_config(run.config)
  model = torch_reference.NotaGen(cfg.patch_length, cfg.patch_layers, cfg.char_layers,
                                  cfg.hidden)
  learning_rate = run.config.optimizer.learning_rate
  optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
  lr_scheduler = transformers.get_constant_schedule_with_warmup(optimizer=optimizer,
                                                                 num_warmup_steps=1000)
  optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)

  pretrained = torch.load(trained_run / "final.pth", map_location="cpu")
  cpu_model = copy.deepcopy(model)
  cpu_model.load_state_dict(pretrained["model"])
  model.load_state_dict(cpu_model.state_dict())
  print(f"Successfully Loaded Pretrained Checkpoint at Epoch {pretrained['epoch']} with Loss "
        f"{pretrained['min_eval_loss']}")
  assert (pretrained["epoch"], pretrained["min_eval_loss"]) == (saved["epoch"],
                                                                saved["min_eval_loss"])

  checkpoint_ = torch.load(trained_run / "resume.pth", map_location="cpu")
  cpu_model = copy.deepcopy(model)
  cpu_model.load_state_dict(checkpoint_["model"])
  model.load_state_dict(cpu_model.state_dict())
  optimizer.load_state_dict(checkpoint_["optimizer"])
  lr_scheduler.load_state_dict(checkpoint_["lr_sched"])
  pre_epoch = checkpoint_["epoch"]
  best_epoch = checkpoint_["best_epoch"]
  min_eval_loss = checkpoint_["min_eval_loss"]
  print("Successfully Loaded Checkpoint from Epoch %d" % pre_epoch)
  assert f"from Epoch {saved['epoch']}" in capsys.readouterr().out
  assert (best_epoch, min_eval_loss) == (saved["best_epoch"], saved["min_eval_loss"])
  assert lr_scheduler.last_epoch == RUN_STEPS // ACCUM
  assert len(optimizer.state) == len(torch_port.parameter_keys(cfg)) - 1  # all but the unused wte


def test_run_sources_and_progress_at_a_step(trained_run):
  evals = {row["step"]: row["loss"] for row in map(
      json.loads, (trained_run / "metrics.jsonl").read_text().splitlines())
      if row["split"] == "eval"}
  assert port.find_run(trained_run / trainer.FINAL_PARAMS).step == RUN_STEPS
  early = port.find_run(trained_run / "checkpoints" / "2")
  assert early.step == port.find_run(trained_run, step=2).step == 2
  assert port.run_progress(early)["min_eval_loss"] == evals[2]  # later evals do not count
  with pytest.raises(ValueError, match="holds step 2, not step 4"):
    port.find_run(trained_run / "checkpoints" / "2", step=4)


def test_optimizer_state_needs_a_run(golden_dir, tmp_path):
  with pytest.raises(ValueError, match="training run"):
    port.main(["to-torch", str(golden_dir / "tiny.pth"), str(tmp_path / "x.pth"),
               "--optimizer_state"])
