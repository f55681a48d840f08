"""Checkpoint conversion between NotaGen's PyTorch files and ours.

  python -m notagen_jax.port from-torch CKPT.pth|CKPT.safetensors OUT_DIR
  python -m notagen_jax.port to-torch SOURCE OUT.pth [--safetensors OUT.safetensors]
                                      [--optimizer_state] [--step N]

to-torch writes what the original's train-gen.py saves and reads back: `model`, `epoch`,
`best_epoch`, `min_eval_loss`, and with --optimizer_state also `optimizer` (torch.optim.AdamW's
state) and `lr_sched` (its scheduler's), which its resume path (LOAD_FROM_CHECKPOINT) loads.
SOURCE: a params dir, a NotaGen .pth/.safetensors, or a training run: its workdir (the latest
checkpoint, or --step), one of its checkpoints (WORKDIR/checkpoints/N) or its final_params.

From a run, `epoch` is the number of passes over its training data completed (steps x global
batch // training pieces, or pairs for DPO; 0 when the data cannot be read here), and `best_epoch`,
`min_eval_loss` those of its lowest eval loss logged up to the step. Without an eval (or a run),
they are 0 and 100, the values the original starts from, so its first eval becomes the best.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from notagen_jax import checkpoint
from notagen_jax import cli
from notagen_jax import model as model_lib
from notagen_jax import storage
from notagen_jax import torch_port
from notagen_jax import trainer
from notagen_jax.data import pipeline
from notagen_jax.data import shards

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "config.json"
METRICS = "metrics.jsonl"
NO_EVAL_LOSS = 100.0  # the original's min_eval_loss before its first eval


@dataclasses.dataclass(frozen=True)
class Run:
  """A training run's workdir and config, and the train step to export."""
  workdir: epath.Path
  config: ml_collections.ConfigDict
  step: int


def find_run(source: str | epath.PathLike, step: int | None = None) -> Run | None:
  """The run `source` belongs to (its workdir, a checkpoint of it, its final params); None if
  `source` is no run. `step` picks a checkpoint of a workdir (default: the latest)."""
  path = storage.path(source)
  fixed = None
  if (path / CHECKPOINTS).is_dir():
    workdir = path
  elif path.parent.name == CHECKPOINTS and path.name.isdigit():
    workdir, fixed = path.parent.parent, int(path.name)
  elif ((final := trainer.final_params_step(path)) is not None
        and (path.parent / RUN_CONFIG).is_file()):
    workdir, fixed = path.parent, final
  else:
    return None
  if step is None:
    step = fixed
  elif fixed is not None and step != fixed:
    raise ValueError(f"{source} holds step {fixed}, not step {step}")
  if step is None:
    with _state_manager(workdir) as manager:
      step = manager.latest_step()
    if step is None:
      raise ValueError(f"{workdir / CHECKPOINTS} holds no checkpoint")
  config = ml_collections.ConfigDict(json.loads((workdir / RUN_CONFIG).read_text()))
  return Run(workdir, config, step)


def _state_manager(workdir: epath.Path) -> ocp.CheckpointManager:
  """The run's checkpoints, their TrainState item only (the data iterator is not needed)."""
  return ocp.CheckpointManager(workdir / CHECKPOINTS,
                               item_handlers={"state": ocp.StandardCheckpointHandler()})


def restore_train_state(run: Run) -> trainer.TrainState:
  """The run's TrainState (params, optimizer state, step, RNG) at `run.step`, on one device."""
  cfg = trainer.model_config(run.config)
  tx, _ = trainer.make_optimizer(run.config)

  def init() -> trainer.TrainState:  # as trainer.build_setup's, for the shapes only
    _, params, _ = nnx.split(model_lib.NotaGen(cfg, nnx.Rngs(0)), nnx.Param, ...)
    return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), rng=jax.random.key(0))

  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local),
                        jax.eval_shape(init))
  with _state_manager(run.workdir) as manager:
    restored = manager.restore(run.step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
  return restored["state"]


def _pieces_per_epoch(c: ml_collections.ConfigDict) -> int | None:
  """Training pieces (DPO: pairs) in one pass over the run's data; None if it cannot be read."""
  try:
    if c.mode == "dpo":
      chosen, rejected = pipeline.preference_pairs(c.data.preference_file)
      return len(chosen) * len(rejected)
    return len(shards.open_split(c.data.shards_dir, "train"))
  except (OSError, ValueError) as error:
    print(f"epoch written as 0: the run's training data cannot be read ({error})",
          file=sys.stderr)
    return None


def run_progress(run: Run) -> dict[str, Any]:
  """`epoch`, `best_epoch` and `min_eval_loss` of the run at its step (see the module doc)."""
  pieces = _pieces_per_epoch(run.config)
  epoch_at = lambda step: 0 if not pieces else step * run.config.data.batch_size // pieces
  metrics = storage.path(run.workdir) / METRICS
  rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()
          ] if metrics.exists() else []
  evals = [row for row in rows if row["split"] == "eval" and row["step"] <= run.step]
  best = min(evals, key=lambda row: row["loss"], default=None)
  return {"epoch": epoch_at(run.step),
          "best_epoch": 0 if best is None else epoch_at(best["step"]),
          "min_eval_loss": NO_EVAL_LOSS if best is None else float(best["loss"])}


def _is_adam(node: Any) -> bool:
  return isinstance(node, optax.ScaleByAdamState)


def optimizer_state(run: Run, state: trainer.TrainState) -> dict[str, Any]:
  """`optimizer` and `lr_sched` of the original's checkpoint from the run's TrainState.

  The Adam state sits in make_optimizer's chain (after any clipping, inside MultiSteps under
  accumulation); its count is the number of updates, torch's `step`. The learning rate is the
  one our next update would use, and the scheduler stands at our schedule's position. (The
  original's train-gen.py builds its scheduler on an AdamW it then replaces, so what it trains
  with is the param group's learning rate, unchanged by its scheduler.)
  """
  o = run.config.optimizer
  adam = [node for node in jax.tree.leaves(state.opt_state, is_leaf=_is_adam) if _is_adam(node)]
  if len(adam) != 1:
    raise ValueError(f"expected one Adam state in the run's optimizer state, found {len(adam)}")
  if isinstance(state.opt_state, optax.MultiStepsState) and int(state.opt_state.mini_step):
    print(f"{int(state.opt_state.mini_step)} of {o.grad_accum_steps} accumulated gradients of "
          "the next update are dropped: torch keeps none between updates", file=sys.stderr)
  _, schedule = trainer.make_optimizer(run.config)
  step = int(state.step)
  lr = float(schedule(step))
  return {"optimizer": torch_port.adamw_state_dict(
              nnx.to_pure_dict(adam[0].mu), nnx.to_pure_dict(adam[0].nu), int(adam[0].count),
              trainer.model_config(run.config), lr=lr, betas=(o.b1, o.b2), eps=o.eps,
              weight_decay=o.weight_decay),
          "lr_sched": torch_port.lr_scheduler_state_dict(o.learning_rate, lr,
                                                         step // o.grad_accum_steps)}


def torch_checkpoint(source: str | epath.PathLike, step: int | None = None,
                     with_optimizer: bool = False) -> dict[str, Any]:
  """The original's training checkpoint from `source`, `model` as numpy; `optimizer` and
  `lr_sched` too with `with_optimizer` (a run's only), in the original's key order."""
  path = storage.path(source)
  run = find_run(path, step)
  if run is None and (with_optimizer or step is not None):
    raise ValueError(f"{source}: optimizer state and --step need a training run (its workdir, "
                     f"one of its {CHECKPOINTS}/N or its final params)")
  is_params = (path / checkpoint.PARAMS).is_dir() or path.suffix in checkpoint.TORCH_SUFFIXES
  if run is None and not is_params:
    raise ValueError(f"{source}: not a checkpoint (a params dir, a NotaGen "
                     f"{'/'.join(checkpoint.TORCH_SUFFIXES)} or a training run)")
  state = restore_train_state(run) if run and (with_optimizer or not is_params) else None
  if is_params:
    model = checkpoint.export_state_dict(checkpoint.load_model(path))
  else:
    cfg = trainer.model_config(run.config)
    params = nnx.to_pure_dict(state.params)
    # Never read by the model nor trained, so not in the TrainState: any value loads.
    params["patch"]["unused_wte"] = np.zeros((1, cfg.hidden), np.float32)
    model = torch_port.state_dict_from_params(params, cfg)
  out = {"model": model}
  if with_optimizer:
    out.update(optimizer_state(run, state))
  if run is None:
    return {**out, "epoch": 0, "best_epoch": 0, "min_eval_loss": NO_EVAL_LOSS}
  return {**out, **run_progress(run)}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m notagen_jax.port", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  from_torch = commands.add_parser("from-torch", help="NotaGen .pth/.safetensors -> Orbax dir")
  from_torch.add_argument("checkpoint")
  from_torch.add_argument("out_dir")
  to_torch = commands.add_parser("to-torch", help="our checkpoint -> NotaGen .pth")
  to_torch.add_argument("checkpoint")
  to_torch.add_argument("out_pth")
  to_torch.add_argument("--safetensors", help="also write this .safetensors file (model only)")
  to_torch.add_argument("--optimizer_state", action="store_true",
                        help="also write the run's AdamW and scheduler state (a run's checkpoint)")
  to_torch.add_argument("--step", type=int, help="the run's checkpoint (default: the latest)")
  args = parser.parse_args(argv)

  if args.command == "from-torch":
    with cli.reported(args.checkpoint, errors=(Exception,)):
      model = checkpoint.load_model(args.checkpoint)
    checkpoint.save_params(args.out_dir, model)
    print(f"wrote {args.out_dir} ({model.cfg.patch_layers}/{model.cfg.char_layers} layers, "
          f"hidden {model.cfg.hidden}, patch_length {model.cfg.patch_length})")
    return
  out = torch_checkpoint(args.checkpoint, args.step, args.optimizer_state)
  state_dict = out.pop("model")
  torch_port.save_pth(state_dict, args.out_pth, extra=out)
  print(f"wrote {args.out_pth} ({len(state_dict)} tensors, "
        + ", ".join(f"{key} {value}" for key, value in out.items()
                    if key not in ("optimizer", "lr_sched"))
        + (", optimizer and lr_sched" if args.optimizer_state else "") + ")")
  if args.safetensors:
    torch_port.save_safetensors(state_dict, args.safetensors)
    print(f"wrote {args.safetensors}")


if __name__ == "__main__":
  cli.run_argparse(main)
