"""Between our parameter tree and NotaGen's PyTorch state dict: one name map, one per-tensor hook.

Our tree is `nnx.to_pure_dict(nnx.state(model))` (Params and the one `Extra`); the state dict uses
the original's HF GPT-2 names. The same map drives both directions, and every conversion is a
transpose or a reshape, so torch -> ours -> torch is bit-identical. The same hook carries Adam's
moments (trees shaped like the params) into torch.optim.AdamW's state. torch is imported only to
read or write `.pth` files and optimizer state.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from notagen_jax import model as model_lib
from notagen_jax import storage

Path = tuple[Any, ...]
PATCH = "patch_level_decoder."
CHAR = "char_level_decoder.base."
LM_HEAD = CHAR + "lm_head.weight"
CHAR_WTE = CHAR + "transformer.wte.weight"
# Block parameter -> GPT-2 name; kind 'heads' reshapes between [.., 3H] / [H, ..] and head axes.
_BLOCK = (
    (("ln_1", "scale"), "ln_1.weight", "copy"),
    (("ln_1", "bias"), "ln_1.bias", "copy"),
    (("qkv",), "attn.c_attn.weight", "heads"),
    (("qkv_bias",), "attn.c_attn.bias", "heads"),
    (("attn_out",), "attn.c_proj.weight", "heads"),
    (("attn_out_bias",), "attn.c_proj.bias", "copy"),
    (("ln_2", "scale"), "ln_2.weight", "copy"),
    (("ln_2", "bias"), "ln_2.bias", "copy"),
    (("fc",), "mlp.c_fc.weight", "copy"),
    (("fc_bias",), "mlp.c_fc.bias", "copy"),
    (("proj",), "mlp.c_proj.weight", "copy"),
    (("proj_bias",), "mlp.c_proj.bias", "copy"),
)


def name_map(cfg: model_lib.ModelConfig) -> list[tuple[Path, str, str]]:
  """(our path, state-dict key, transform) for every tensor; lm_head is the tied wte, added apart."""
  entries = [
      (("patch", "embed"), PATCH + "patch_embedding.weight", "transpose"),
      (("patch", "embed_bias"), PATCH + "patch_embedding.bias", "copy"),
      (("patch", "unused_wte"), PATCH + "base.wte.weight", "copy"),
      (("patch", "pos"), PATCH + "base.wpe.weight", "copy"),
      (("patch", "ln_f", "scale"), PATCH + "base.ln_f.weight", "copy"),
      (("patch", "ln_f", "bias"), PATCH + "base.ln_f.bias", "copy"),
      (("char", "wte"), CHAR_WTE, "copy"),
      (("char", "wpe"), CHAR + "transformer.wpe.weight", "copy"),
      (("char", "ln_f", "scale"), CHAR + "transformer.ln_f.weight", "copy"),
      (("char", "ln_f", "bias"), CHAR + "transformer.ln_f.bias", "copy"),
  ]
  for ours, theirs, layers in (("patch", PATCH + "base.h.", cfg.patch_layers),
                               ("char", CHAR + "transformer.h.", cfg.char_layers)):
    for i in range(layers):
      entries += [((ours, "blocks", i) + path, f"{theirs}{i}.{name}", kind)
                  for path, name, kind in _BLOCK]
  return entries


def torch_shapes(cfg: model_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every state-dict key of a NotaGen of this size with its shape, in the original's order."""
  h, n_in = cfg.hidden, cfg.patch_size * cfg.vocab
  block = {"ln_1.weight": (h,), "ln_1.bias": (h,), "attn.c_attn.weight": (h, 3 * h),
           "attn.c_attn.bias": (3 * h,), "attn.c_proj.weight": (h, h), "attn.c_proj.bias": (h,),
           "ln_2.weight": (h,), "ln_2.bias": (h,), "mlp.c_fc.weight": (h, 4 * h),
           "mlp.c_fc.bias": (4 * h,), "mlp.c_proj.weight": (4 * h, h), "mlp.c_proj.bias": (h,)}
  shapes = {PATCH + "patch_embedding.weight": (h, n_in), PATCH + "patch_embedding.bias": (h,),
            PATCH + "base.wte.weight": (1, h), PATCH + "base.wpe.weight": (cfg.patch_length, h)}
  shapes.update({f"{PATCH}base.h.{i}.{name}": shape
                 for i in range(cfg.patch_layers) for name, shape in block.items()})
  shapes.update({PATCH + "base.ln_f.weight": (h,), PATCH + "base.ln_f.bias": (h,),
                 CHAR_WTE: (cfg.vocab, h), CHAR + "transformer.wpe.weight": (cfg.patch_size + 1, h)})
  shapes.update({f"{CHAR}transformer.h.{i}.{name}": shape
                 for i in range(cfg.char_layers) for name, shape in block.items()})
  shapes.update({CHAR + "transformer.ln_f.weight": (h,), CHAR + "transformer.ln_f.bias": (h,),
                 LM_HEAD: (cfg.vocab, h)})
  return shapes


def config_from_state_dict(state_dict: Mapping[str, Any], **overrides: Any) -> model_lib.ModelConfig:
  """The model size read off the tensor shapes (other fields from `overrides` or defaults)."""
  needed = [PATCH + "base.wpe.weight", CHAR + "transformer.wpe.weight"]
  missing = [key for key in needed if key not in state_dict]
  if missing:
    raise ValueError(f"cannot infer the model size: missing {missing}")
  # Highest index + 1, so that a gap shows up as a missing layer in the check.
  layers = lambda prefix: 1 + max((int(m.group(1)) for key in state_dict
                                   if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))),
                                  default=-1)
  patch_length, hidden = state_dict[needed[0]].shape
  return model_lib.ModelConfig(
      patch_size=state_dict[needed[1]].shape[0] - 1, patch_length=patch_length,
      patch_layers=layers(PATCH + "base.h."), char_layers=layers(CHAR + "transformer.h."),
      hidden=hidden, **overrides)


def _convert(value: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
  """The per-tensor hook, either direction: `shape` is the target side's shape."""
  return value.T if kind == "transpose" else value.reshape(shape)


def _get(tree: Mapping, path: Path) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _has(tree: Mapping, path: Path) -> bool:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return False
    tree = tree[key]
  return True


def _set(tree: dict, path: Path, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def check_state_dict(state_dict: Mapping[str, Any], cfg: model_lib.ModelConfig) -> None:
  """Raises one error naming every missing, unexpected or mis-shaped tensor."""
  expected = torch_shapes(cfg)
  problems = [f"missing {key} {list(shape)}" for key, shape in expected.items()
              if key not in state_dict]
  problems += [f"unexpected {key}" for key in state_dict if key not in expected]
  problems += [f"shape of {key}: {list(np.shape(state_dict[key]))}, expected {list(shape)}"
               for key, shape in expected.items()
               if key in state_dict and tuple(np.shape(state_dict[key])) != shape]
  if not problems and not np.array_equal(np.asarray(state_dict[LM_HEAD]),
                                         np.asarray(state_dict[CHAR_WTE])):
    problems.append(f"{LM_HEAD} differs from {CHAR_WTE}: the head is tied to the embedding")
  if problems:
    raise ValueError("state dict does not match NotaGen "
                     f"(patch_length {cfg.patch_length}, layers {cfg.patch_layers}/"
                     f"{cfg.char_layers}, hidden {cfg.hidden}):\n  " + "\n  ".join(problems))


def params_from_state_dict(state_dict: Mapping[str, Any],
                           cfg: model_lib.ModelConfig | None = None
                           ) -> tuple[model_lib.ModelConfig, dict]:
  """(config, our pure param dict) from a NotaGen state dict of numpy arrays (float32)."""
  cfg = cfg or config_from_state_dict(state_dict)
  check_state_dict(state_dict, cfg)
  shapes = _our_shapes(cfg)
  params: dict = {}
  for path, key, kind in name_map(cfg):
    value = np.asarray(state_dict[key], dtype=np.float32)
    _set(params, path, _convert(value, kind, shapes[path]))
  return cfg, params


def torch_layout(tree: Mapping, cfg: model_lib.ModelConfig) -> dict[str, np.ndarray]:
  """The tensors of `tree` (our params, or a tree shaped like them such as Adam's moments; entries
  may be missing) under their state-dict keys and in torch's layout, float32."""
  shapes = torch_shapes(cfg)
  return {key: _convert(np.asarray(_get(tree, path), np.float32), kind, shapes[key])
          for path, key, kind in name_map(cfg) if _has(tree, path)}


def state_dict_from_params(params: Mapping, cfg: model_lib.ModelConfig) -> dict[str, np.ndarray]:
  """NotaGen's state dict (float32 numpy, original key order) from our pure param dict."""
  flat = torch_layout(params, cfg)
  flat[LM_HEAD] = flat[CHAR_WTE]
  return {key: flat[key] for key in torch_shapes(cfg)}


def parameter_keys(cfg: model_lib.ModelConfig) -> list[str]:
  """The state-dict keys of the original's `model.parameters()`, in its order (the tied lm_head
  is wte's parameter, listed once)."""
  return [key for key in torch_shapes(cfg) if key != LM_HEAD]


def adamw_state_dict(mu: Mapping, nu: Mapping, count: int, cfg: model_lib.ModelConfig, *,
                     lr: float, betas: tuple[float, float], eps: float,
                     weight_decay: float) -> dict:
  """torch.optim.AdamW's state_dict from our Adam state: moments `mu`, `nu` (pure dicts shaped like
  the params, each carried by its parameter's transform) after `count` updates.

  One param group over `parameter_keys`, as the original's `AdamW(model.parameters(), lr=...)`
  has, or its load_state_dict refuses the file; so `weight_decay` applies to every parameter
  there. A parameter without moments (the patch decoder's wte, which never gets a gradient) has
  no state, as in torch.
  """
  import torch  # pylint: disable=import-outside-toplevel
  exp_avg, exp_avg_sq = torch_layout(mu, cfg), torch_layout(nu, cfg)
  keys = parameter_keys(cfg)
  tensor = lambda value: torch.from_numpy(np.array(value, np.float32))
  state = {i: {"step": torch.tensor(float(count), dtype=torch.float32),
               "exp_avg": tensor(exp_avg[key]), "exp_avg_sq": tensor(exp_avg_sq[key])}
           for i, key in enumerate(keys) if key in exp_avg}
  # torch's own group fields (they change across versions) around our hyper-parameters.
  group = torch.optim.AdamW([torch.zeros(0)], lr=lr, betas=tuple(betas), eps=eps,
                            weight_decay=weight_decay).state_dict()["param_groups"][0]
  return {"state": state, "param_groups": [{**group, "params": list(range(len(keys)))}]}


def lr_scheduler_state_dict(base_lr: float, lr: float, updates: int) -> dict:
  """The state_dict of the original's scheduler (transformers' get_constant_schedule_with_warmup,
  a LambdaLR) after `updates` optimizer updates, `lr` being the next update's learning rate.

  A LambdaLR stores its position and learning rates, not its function: loaded into the original's,
  it goes on from `updates` with the original's warmup.
  """
  import torch  # pylint: disable=import-outside-toplevel
  optimizer = torch.optim.AdamW([torch.zeros(0)], lr=base_lr)
  state = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0).state_dict()
  state.update(last_epoch=updates, _step_count=updates + 1, _last_lr=[lr])
  return state


def _our_shapes(cfg: model_lib.ModelConfig) -> dict[Path, tuple[int, ...]]:
  abstract = nnx.eval_shape(lambda: model_lib.NotaGen(cfg, nnx.Rngs(0)))
  tree = nnx.to_pure_dict(nnx.state(abstract))
  return {path: tuple(_get(tree, path).shape) for path, _, _ in name_map(cfg)}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A NotaGen state dict as numpy from `.pth` (`{'model': sd}` or bare) or `.safetensors`."""
  path = storage.path(path)
  if path.suffix == ".safetensors":
    from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
    return dict(load(path.read_bytes()))
  import torch  # pylint: disable=import-outside-toplevel
  obj = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
  state_dict = obj["model"] if isinstance(obj, dict) and "model" in obj else obj
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path} holds no state dict (got {type(state_dict).__name__})")
  return {key: value.detach().to(torch.float32).numpy() for key, value in state_dict.items()}


def save_pth(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike,
             extra: Mapping[str, Any] | None = None) -> None:
  """`{'model': state_dict, **extra}` with lm_head sharing wte's storage, as the original saves
  it; `extra` holds the rest of a training checkpoint (optimizer, lr_sched, epoch, ...)."""
  import torch  # pylint: disable=import-outside-toplevel
  tensors = {key: torch.from_numpy(np.array(value, np.float32))
             for key, value in state_dict.items() if key != LM_HEAD}
  tensors[LM_HEAD] = tensors[CHAR_WTE]
  buffer = io.BytesIO()
  torch.save({"model": {key: tensors[key] for key in state_dict}, **(extra or {})}, buffer)
  storage.path(path).write_bytes(buffer.getvalue())


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  storage.path(path).write_bytes(
      save({key: np.ascontiguousarray(value, np.float32) for key, value in state_dict.items()}))
