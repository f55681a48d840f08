"""Model checkpoints: Orbax params plus the ModelConfig as JSON, or NotaGen's torch files on the fly.

A params checkpoint is a directory: `config.json` and `params/` (an Orbax PyTree of the pure state
dict of the model, `Extra` tensors included so that exports round-trip).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from notagen_jax import model as model_lib
from notagen_jax import storage
from notagen_jax import torch_port

CONFIG = "config.json"
PARAMS = "params"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def build(cfg: model_lib.ModelConfig, params: dict | None = None, seed: int = 0) -> model_lib.NotaGen:
  """A model of `cfg`, randomly initialized or holding `params` (a pure dict)."""
  if params is None:
    return model_lib.create(cfg, seed)
  # Shapes only: a random init would be thrown away (and is slow for large models).
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.NotaGen(cfg, nnx.Rngs(seed))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
  return nnx.merge(graphdef, state)


def save_params(directory: str | os.PathLike, model: model_lib.NotaGen) -> None:
  """Writes `config.json` and `params/` into `directory` (created; params must not exist yet)."""
  directory = storage.path(directory)
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(model.cfg.to_json())
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / PARAMS, nnx.to_pure_dict(nnx.state(model)))


def restore_params(directory: str | os.PathLike, **overrides: Any) -> model_lib.NotaGen:
  """The model saved by `save_params`; `overrides` change non-shape config fields (dtype, ...)."""
  directory = storage.path(directory)
  cfg = model_lib.ModelConfig.from_json((directory / CONFIG).read_text())
  cfg = dataclasses.replace(cfg, **overrides)
  abstract = nnx.eval_shape(lambda: model_lib.NotaGen(cfg, nnx.Rngs(0)))
  # Onto one local device, whatever mesh saved it (a trainer may have sharded it over many).
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local),
                        nnx.to_pure_dict(nnx.state(abstract)))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(directory / PARAMS, target)
  return build(cfg, params)


def load_model(path: str | os.PathLike, **overrides: Any) -> model_lib.NotaGen:
  """A model from a `save_params` directory or a NotaGen `.pth` / `.safetensors` (converted)."""
  path = storage.path(path)
  if path.is_dir():
    return restore_params(path, **overrides)
  if path.suffix not in TORCH_SUFFIXES:
    raise ValueError(f"{path}: neither a checkpoint directory nor one of {TORCH_SUFFIXES}")
  state_dict = torch_port.load_state_dict(path)
  cfg = torch_port.config_from_state_dict(state_dict, **overrides)
  _, params = torch_port.params_from_state_dict(state_dict, cfg)
  return build(cfg, params)


def export_state_dict(model: model_lib.NotaGen) -> dict:
  """NotaGen's state dict (numpy) of `model`."""
  return torch_port.state_dict_from_params(nnx.to_pure_dict(nnx.state(model)), model.cfg)


class TrainCheckpointer:
  """Orbax manager of a training run: state (params, optimizer, step, RNG) + Grain iterator.

  Keeps the last `keep` checkpoints plus the best by eval loss; saves asynchronously. Restoring
  reads each array straight into the shardings of the current mesh, so a run can resume on a
  different mesh.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    self._manager = ocp.CheckpointManager(
        storage.path(directory),
        options=ocp.CheckpointManagerOptions(preservation_policy=policy,
                                             enable_async_checkpointing=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_iterator: Any, metrics: dict | None = None,
           force: bool = False) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)),
        metrics=metrics, force=force)

  def restore(self, step: int, state: Any, shardings: Any, data_iterator: Any) -> tuple[Any, Any]:
    """(state, iterator) at `step`; `state` gives shapes and dtypes, `shardings` the placement."""
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"], restored["data"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
