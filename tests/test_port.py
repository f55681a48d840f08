"""Checkpoint porting: name map, round trips, errors, the entry points."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import torch_reference
from notagen_jax import checkpoint
from notagen_jax import loglik
from notagen_jax import model as model_lib
from notagen_jax import port
from notagen_jax import torch_port


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
  assert list(exported) == ["model"]
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
  np.testing.assert_allclose(out.loss, expected["loss"].item(), rtol=1e-5)
  np.testing.assert_allclose(out.sum_logprob[0], expected["sum_logprob"].item(), rtol=1e-5)
  assert abs(float(out.loss) - case["loss"]) > 0.1


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
    np.testing.assert_allclose(line["mean_nll"], case["loss"], rtol=1e-4)
    np.testing.assert_allclose(line["sum_logprob"], case["sum_char_logprob"], rtol=1e-4)
