"""The training loop library: pre-training, fine-tuning and DPO over a device mesh.

`train_and_evaluate(config, workdir)` is the whole run: mesh, sharded state (initialized or loaded
from a checkpoint, ours or NotaGen's .pth), the Grain iterator, a jitted step with explicit
shardings and donated state, periodic eval, TensorBoard scalars, Orbax checkpoints with the
iterator state, automatic resume and a clean stop on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from notagen_jax import checkpoint
from notagen_jax import config as config_lib
from notagen_jax import losses
from notagen_jax import model as model_lib
from notagen_jax import sharding
from notagen_jax import storage
from notagen_jax.data import pipeline
from notagen_jax.data.tokenizer import Patchilizer

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix (fp32 runs get MFU against this too).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of the model's Params
  opt_state: Any
  rng: jax.Array


class NonFiniteLoss(RuntimeError):
  pass


REFERENCE_LOGPS = "reference_logps.json"
EVAL_REFERENCE_LOGPS = "reference_logps_eval.json"
FINAL_PARAMS = "final_params"
FINAL_STEP = "step.json"  # in FINAL_PARAMS, written last: the export is complete


def model_config(c: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  patch_layers, char_layers, hidden = model_lib.shape_of(c.model.size)
  return model_lib.config_for(
      (c.model.patch_length, patch_layers, char_layers, hidden), dtype=c.model.dtype,
      remat=c.model.remat, dropout=c.model.dropout, patch_sampling=c.model.patch_sampling,
      char_packing=c.model.char_packing, scan_layers=c.model.scan_layers)


def forward_flops(cfg: model_lib.ModelConfig, n_patches: int) -> float:
  """Matmul FLOPs of one forward pass over a row of n_patches (the char decoder on n_patches-1).

  The char decoder runs patch_size positions per patch: the original's 17th only predicts past the
  patch, and the model does not compute it.
  """
  h, p = cfg.hidden, cfg.patch_size
  block = lambda tokens, context: 2 * tokens * 12 * h * h + 4 * tokens * context * h
  patch_level = 2 * n_patches * cfg.patch_size * cfg.vocab * h + cfg.patch_layers * block(
      n_patches, n_patches)
  char_level = (n_patches - 1) * (cfg.char_layers * block(p, p) + 2 * p * h * cfg.vocab)
  return float(patch_level + char_level)


def step_flops(setup: Setup, local_batch: dict) -> float:
  """Model FLOPs of a training step on this process's rows: 3x the forward over each row's real
  patches (chosen and rejected for DPO, plus a reference forward when it runs each step)."""
  cfg = setup.model_cfg
  masks = [local_batch[k] for k in ("masks", "chosen_masks", "rejected_masks") if k in local_batch]
  forward = sum(forward_flops(cfg, int(n)) for m in masks for n in np.sum(m, axis=-1) if n > 1)
  return forward * (4 if setup.reference is not None else 3)


def peak_flops(c: ml_collections.ConfigDict) -> float | None:
  if c.peak_flops_per_device:
    return c.peak_flops_per_device
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: no decay on biases and LayerNorm parameters."""
  def decays(path, _):
    # The param names are the dict keys; a Variable adds a trailing `.value` attribute.
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    return not (names[-1].endswith("bias") or any(n.startswith("ln") for n in names))
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(c: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation,
                                                            optax.Schedule]:
  """AdamW (with clipping and accumulation as configured) and its learning rate by train step.

  Under accumulation the schedule advances once per optimizer update (every `grad_accum_steps`
  train steps), so its lengths, given in train steps like `train.num_steps`, are divided by k:
  the run still ends at the end of its cosine.
  """
  o = c.optimizer
  k = o.grad_accum_steps
  updates, warmup = -(-c.train.num_steps // k), -(-o.warmup_steps // k)
  if o.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, max(warmup, 1),
                                                  max(updates, warmup + 1))
  elif warmup:
    schedule = optax.join_schedules([
        optax.linear_schedule(0.0, o.learning_rate, warmup),
        optax.constant_schedule(o.learning_rate)], [warmup])
  else:
    schedule = optax.constant_schedule(o.learning_rate)
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=_decay_mask))
  tx = optax.chain(*parts)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k)
  return tx, lambda step: schedule(step // k)


def _rngs(rng: jax.Array, step: jax.Array) -> nnx.Rngs:
  """This step's dropout and patch-sampling streams: a function of (seed, step) only."""
  dropout, sampling = jax.random.split(jax.random.fold_in(rng, step))
  return nnx.Rngs(dropout=dropout, sampling=sampling)


def nll_loss(model: model_lib.NotaGen, batch: dict, rngs: nnx.Rngs | None,
             deterministic: bool, packed_len: int | None = None) -> tuple[jax.Array, dict]:
  out = model_lib.forward(model, batch["patches"], batch["masks"], deterministic=deterministic,
                          rngs=rngs, packed_len=packed_len)
  n_chars = out.char_mask.sum()
  return out.loss, {"n_chars": n_chars, "nll_sum": -out.char_logprob.sum()}


def sequence_logprobs(model: model_lib.NotaGen, chosen: dict, rejected: dict,
                      rngs: nnx.Rngs | None, deterministic: bool,
                      packed_len: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Summed log-probs of chosen and rejected pieces in one forward over both; and the char count."""
  patches = jnp.concatenate([chosen["patches"], rejected["patches"]])
  masks = jnp.concatenate([chosen["masks"], rejected["masks"]])
  out = model_lib.forward(model, patches, masks, deterministic=deterministic, rngs=rngs,
                          packed_len=packed_len)
  n = chosen["patches"].shape[0]
  return out.sum_logprob[:n], out.sum_logprob[n:], out.n_chars.sum()


DPO_FNS = {"dpo_positive": losses.dpo_positive, "dpo": losses.dpo, "ipo": losses.ipo}


def dpo_loss_fn(c: ml_collections.ConfigDict) -> Callable:
  loss_fn = DPO_FNS[c.dpo.loss]
  extra = {"lam": c.dpo.lam} if c.dpo.loss == "dpo_positive" else {}

  def dpo_loss(model, reference, batch, rngs, deterministic, packed_len=None):
    chosen = {"patches": batch["chosen"], "masks": batch["chosen_masks"]}
    rejected = {"patches": batch["rejected"], "masks": batch["rejected_masks"]}
    policy_chosen, policy_rejected, n_chars = sequence_logprobs(model, chosen, rejected, rngs,
                                                                deterministic, packed_len)
    if "ref_chosen_logp" in batch:
      ref_chosen, ref_rejected = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
    else:
      ref_deterministic = deterministic or not c.dpo.reference_dropout
      ref_chosen, ref_rejected, _ = jax.lax.stop_gradient(sequence_logprobs(
          reference, chosen, rejected, None if ref_deterministic else rngs, ref_deterministic,
          packed_len))
    loss, metrics = loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                            beta=c.dpo.beta, **extra)
    return loss, {**metrics, "n_chars": n_chars}

  return dpo_loss


@dataclasses.dataclass
class Setup:
  """Everything the loop needs, built once from the config."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model_cfg: model_lib.ModelConfig
  graphdef: Any
  rest: Any  # non-trainable model state (kept for export), replicated
  state: TrainState
  state_shardings: TrainState
  reference: Any  # DPO reference params (None when precomputed or not DPO)
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def _load_init_params(c: ml_collections.ConfigDict, cfg: model_lib.ModelConfig,
                      abstract_params: Any) -> Any:
  """The init checkpoint's params, checked against the configured model size."""
  loaded = checkpoint.load_model(c.init_checkpoint)
  mismatched = [f"{field} is {getattr(loaded.cfg, field)}, config has {getattr(cfg, field)}"
                for field in ("patch_layers", "char_layers", "hidden", "patch_size", "vocab")
                if getattr(loaded.cfg, field) != getattr(cfg, field)]
  if mismatched:
    raise ValueError(f"init_checkpoint {c.init_checkpoint} does not fit config.model.size "
                     f"{c.model.size!r}: " + "; ".join(mismatched))
  if loaded.cfg.patch_length < cfg.patch_length:
    raise ValueError(
        f"init_checkpoint {c.init_checkpoint}: patch_length {loaded.cfg.patch_length} < "
        f"config.model.patch_length {cfg.patch_length}")
  _, params, rest = nnx.split(loaded, nnx.Param, ...)
  if loaded.cfg.patch_length > cfg.patch_length:
    # Fewer positions than the checkpoint was trained with: keep the first ones.
    params["patch"]["pos"].value = params["patch"]["pos"].value[:cfg.patch_length]
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                               jax.tree_util.tree_leaves(params)):
    if want.shape != got.shape:
      raise ValueError(f"init_checkpoint {c.init_checkpoint}: tensor "
                       f"{jax.tree_util.keystr(path)} has shape {got.shape}, expected {want.shape}")
  return params, rest


def build_setup(c: ml_collections.ConfigDict,
                devices: list[jax.Device] | None = None) -> Setup:
  cfg = model_config(c)
  mesh = sharding.make_mesh(c.mesh.shape, devices)
  c = config_lib.with_global_batch(c, sharding.data_parallel_size(mesh))
  rules = [tuple(rule) for rule in c.mesh.logical_axis_rules]
  tx, schedule = make_optimizer(c)

  def init_model(key):
    return nnx.split(model_lib.NotaGen(cfg, nnx.Rngs(params=key)), nnx.Param, ...)

  def init_state(params, key):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=key)

  key = jax.random.key(c.seed)
  graphdef, abstract_params, _ = jax.eval_shape(init_model, key)
  abstract_state = jax.eval_shape(init_state, abstract_params, key)
  shardings = sharding.state_shardings(abstract_state, mesh, rules)
  reference = None
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if c.init_checkpoint:
    params, rest = _load_init_params(c, cfg, abstract_params)
    params = jax.device_put(params, shardings.params)
    # On the mesh, not on this host's first device: Orbax exports only global arrays. Built from
    # each host's copy: device_put of a host-local array made, with one device per process, a
    # global array whose shard spans both processes, which Orbax could not save.
    rest = jax.tree.map(lambda x: jax.make_array_from_callback(
        x.shape, replicated, lambda index: np.asarray(x)[index]), rest)
    state = jax.jit(init_state, out_shardings=shardings)(params, key)
  else:
    # Sharded initialization: each device computes only its shard, no full copy anywhere.
    def fresh(key):
      _, params, rest = init_model(key)
      return init_state(params, key), rest
    state, rest = jax.jit(fresh, out_shardings=(shardings, replicated))(key)
  if c.mode == "dpo" and not c.dpo.precompute_reference:
    reference = jax.tree.map(jnp.copy, state.params)  # frozen: never passed to the optimizer
  return Setup(c, mesh, cfg, graphdef, rest, state, shardings, reference, tx, schedule)


def _model(setup: Setup, params: Any) -> model_lib.NotaGen:
  return nnx.merge(setup.graphdef, params, setup.rest)


def make_loss_fn(setup: Setup) -> Callable:
  """(params, reference, batch, rng, step) -> (loss, aux) of one training step, dropout on."""
  dpo_loss = dpo_loss_fn(setup.config) if setup.config.mode == "dpo" else None

  def loss_fn(params, reference, batch, rng, step, packed_len=None):
    rngs = _rngs(rng, step)  # made inside the traced function that uses it
    model = _model(setup, params)
    with sharding.activation_mesh(setup.mesh):
      if dpo_loss is not None:
        ref_model = _model(setup, reference) if reference is not None else None
        return dpo_loss(model, ref_model, batch, rngs, False, packed_len)
      return nll_loss(model, batch, rngs, False, packed_len)

  return loss_fn


def make_train_step(setup: Setup) -> Callable:
  skip_nonfinite = setup.config.train.nan_policy == "skip"
  grad_fn = jax.value_and_grad(make_loss_fn(setup), has_aux=True)

  def train_step(state: TrainState, reference: Any, batch: dict,
                 packed_len: int | None = None) -> tuple[TrainState, dict]:
    (loss, aux), grads = grad_fn(state.params, reference, batch, state.rng, state.step,
                                 packed_len)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      # Keep the old params and optimizer state; the step still advances so batches move on.
      new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new,
                         state.replace(step=state.step + 1))
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
               "lr": setup.schedule(state.step), **aux}
    return new, metrics

  reference_sharding = setup.state_shardings.params if setup.reference is not None else None
  return jax.jit(train_step, donate_argnums=0, static_argnums=3,
                 in_shardings=(setup.state_shardings, reference_sharding,
                               sharding.batch_sharding(setup.mesh)),
                 out_shardings=(setup.state_shardings, None))


# Packed char rows are rounded up to 1/8 of the unpacked length: at most 8 compiled variants.
PACKING_BUCKETS = 8


def packed_length(setup: Setup, local_batch: dict) -> int | None:
  """The static packed char-row length for this batch (None when packing is off).

  Computed on the host from the real patches, the same on every process (the largest of theirs),
  rounded up to a bucket so that few lengths ever compile.
  """
  cfg = setup.model_cfg
  if not cfg.char_packing:
    return None
  full = (setup.config.model.patch_length - 1) * cfg.patch_size
  bucket = 64 * -(-full // (64 * PACKING_BUCKETS))  # a multiple of 64, so of the patch size
  if "patches" in local_batch:
    patches, masks = local_batch["patches"], local_batch["masks"]
  else:
    patches = np.concatenate([local_batch["chosen"], local_batch["rejected"]])
    masks = np.concatenate([local_batch["chosen_masks"], local_batch["rejected_masks"]])
  needed = model_lib.packed_length(patches, masks, multiple=bucket)
  if jax.process_count() > 1:
    needed = int(np.max(multihost_utils.process_allgather(np.int32(needed))))
  return min(needed, full)


def make_eval_step(setup: Setup) -> Callable:
  """(params, reference, batch, packed_len) -> metrics, dropout off, replicated on every process.

  A batch of pieces (`patches`, `masks`) gives the NLL sums and each row's summed log-prob (the
  DPO reference pass reads those); a batch of pairs gives the DPO loss and reward metrics.
  """
  dpo_loss = dpo_loss_fn(setup.config) if setup.config.mode == "dpo" else None

  def eval_step(params: Any, reference: Any, batch: dict, packed_len: int | None = None) -> dict:
    model = _model(setup, params)
    with sharding.activation_mesh(setup.mesh):
      if "patches" in batch:
        out = model_lib.forward(model, batch["patches"], batch["masks"], deterministic=True,
                                packed_len=packed_len)
        return {"loss": out.loss, "n_chars": out.char_mask.sum(),
                "nll_sum": -out.char_logprob.sum(), "row_logprob": out.sum_logprob}
      ref_model = _model(setup, reference) if reference is not None else None
      loss, aux = dpo_loss(model, ref_model, batch, None, True, packed_len)
    return {"loss": loss, **aux}

  reference_sharding = setup.state_shardings.params if setup.reference is not None else None
  replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
  return jax.jit(eval_step, static_argnums=3,
                 in_shardings=(setup.state_shardings.params, reference_sharding,
                               sharding.batch_sharding(setup.mesh)),
                 out_shardings=replicated)


def _process_batch_size(c: ml_collections.ConfigDict) -> int:
  if c.data.batch_size % jax.process_count():
    raise ValueError(f"config.data.batch_size {c.data.batch_size} is not a multiple of the "
                     f"{jax.process_count()} processes")
  return c.data.batch_size // jax.process_count()


def make_train_data(c: ml_collections.ConfigDict, ref_logps_path: str | None = None,
                    state: dict | None = None):
  per_process = _process_batch_size(c)
  if c.mode == "dpo":
    ds = pipeline.preference_dataset(
        c.data.preference_file, batch_size=per_process, patch_length=c.model.patch_length,
        seed=c.seed, ref_logps_path=ref_logps_path)
    iterator = iter(ds)
    if state is not None:
      iterator.set_state(state)
    return iterator
  return pipeline.make_iterator(
      c.data.shards_dir, state=state, split="train", batch_size=per_process,
      patch_length=c.model.patch_length, key_sampling=c.data.key_sampling,
      drop_prompt=c.data.drop_prompt, stream_cut=c.data.stream_cut, seed=c.seed,
      num_workers=c.data.num_workers, num_threads=c.data.num_threads)


def eval_batches(c: ml_collections.ConfigDict, ref_logps_path: str | None) -> Iterator[dict]:
  per_process = _process_batch_size(c)
  if c.mode == "dpo":
    if not c.data.eval_preference_file:
      return iter(())
    ds = pipeline.preference_dataset(
        c.data.eval_preference_file, batch_size=per_process, patch_length=c.model.patch_length,
        shuffle=False, num_epochs=1, ref_logps_path=ref_logps_path)
  else:
    try:
      ds = pipeline.make_dataset(
          c.data.shards_dir, split=c.data.eval_split, batch_size=per_process,
          patch_length=c.model.patch_length, key_sampling="original",
          drop_prompt=c.data.drop_prompt, stream_cut=False, shuffle=False, num_epochs=1,
          num_threads=c.data.num_threads)
    except (KeyError, ValueError, FileNotFoundError) as error:
      logging.warning("no eval split %r in %s: %s", c.data.eval_split, c.data.shards_dir, error)
      return iter(())
  return (batch for _, batch in zip(range(c.train.eval_batches), ds))


def precompute_reference_logps(setup: Setup, eval_step: Callable,
                               texts: list[str]) -> list[float]:
  """Each text's summed log-prob under the params the run starts from (dropout off).

  The eval step runs on batches of 2 x data.batch_size pieces (a DPO batch's rows) over the
  mesh, params passed as sharded arguments; every process tokenizes all texts and feeds its own
  share of each batch. The last batch is padded with empty rows.
  """
  c = setup.config
  patchilizer = Patchilizer(patch_length=c.model.patch_length)
  rows = 2 * c.data.batch_size
  per_process = rows // jax.process_count()
  first = jax.process_index() * per_process
  empty = pipeline.pad_rows(np.zeros((0, setup.model_cfg.patch_size), np.int32),
                            c.model.patch_length)
  values = []
  for start in tqdm.trange(0, len(texts), rows, desc="reference log-probs", unit="batch",
                           disable=jax.process_index() != 0 or len(texts) <= rows):
    mine = texts[start + first:start + first + per_process]
    padded = [pipeline.pad_rows(pipeline.preference_ids(patchilizer, t), c.model.patch_length)
              for t in mine] + [empty] * (per_process - len(mine))
    local = {k: np.stack([p[k] for p in padded]) for k in ("patches", "masks")}
    out = eval_step(setup.state.params, None, sharding.global_batch(local, setup.mesh),
                    packed_length(setup, local))
    values.extend(np.asarray(out["row_logprob"]).tolist())
  return values[:len(texts)]


def reference_logps(setup: Setup, eval_step: Callable, pairs_file: str,
                    out: epath.Path) -> str:
  """The reference log-probs of `pairs_file`'s texts, in `out`: {"chosen": [...], "rejected":
  [...], "produced_by": ...}. Reused only when produced from the same pairs, init checkpoint and
  model; otherwise (re)computed."""
  c = setup.config
  produced_by = {"pairs_sha256": storage.sha256(pairs_file), "init_checkpoint": c.init_checkpoint,
                 "model": json.loads(setup.model_cfg.to_json())}
  # Every process reads before anyone writes, so all take the same branch.
  existing = storage.read_json(out)
  multihost_utils.sync_global_devices(f"notagen_jax:read {out.name}")
  if existing is None or existing.get("produced_by") != produced_by:
    chosen, rejected = pipeline.preference_pairs(pairs_file)
    values = precompute_reference_logps(setup, eval_step, chosen + rejected)
    if jax.process_index() == 0:
      out.write_text(json.dumps({"chosen": values[:len(chosen)], "rejected": values[len(chosen):],
                                 "produced_by": produced_by}))
    multihost_utils.sync_global_devices(f"notagen_jax:wrote {out.name}")
  return str(out)


def final_params_step(directory: epath.PathLike) -> int | None:
  """The train step whose params `directory` (a run's final_params) holds; None if incomplete."""
  record = storage.read_json(storage.path(directory) / FINAL_STEP)
  return None if record is None else record["step"]


def _summary(metrics: list[dict]) -> dict[str, float]:
  stacked = {k: np.asarray([float(m[k]) for m in metrics]) for k in metrics[0]}
  return {k: float(v.mean()) for k, v in stacked.items()}


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) the configured training; returns the last logged metrics."""
  c = ml_collections.ConfigDict(c.to_dict())
  c.workdir = workdir or c.workdir
  config_lib.validate(c)
  data, fsdp, _ = sharding.mesh_shape(c.mesh.shape, jax.device_count())
  c = config_lib.with_global_batch(c, data * fsdp)
  check_inputs(c)
  workdir = storage.path(c.workdir)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))

  setup = build_setup(c)
  eval_step = make_eval_step(setup)
  ref_logps_path = eval_ref_logps_path = None
  if c.mode == "dpo" and c.dpo.precompute_reference:
    ref_logps_path = reference_logps(setup, eval_step, c.data.preference_file,
                                     workdir / REFERENCE_LOGPS)
    if c.data.eval_preference_file:
      eval_ref_logps_path = reference_logps(setup, eval_step, c.data.eval_preference_file,
                                            workdir / EVAL_REFERENCE_LOGPS)

  ckpt = checkpoint.TrainCheckpointer(workdir / "checkpoints", keep=c.train.keep_checkpoints)
  data = make_train_data(c, ref_logps_path)
  state = setup.state
  if ckpt.latest_step() is not None:
    state, data = ckpt.restore(ckpt.latest_step(), state, setup.state_shardings, data)
    logging.info("resumed from step %d", int(state.step))
  train_step = make_train_step(setup)
  lead = jax.process_index() == 0
  writer = storage.summary_writer(workdir / "tensorboard") if lead else None
  log = storage.JsonLines(workdir / "metrics.jsonl") if lead else None
  peak = peak_flops(c)
  n_devices = jax.device_count()

  stop = {"signal": False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
  first_step = int(state.step)
  history, last = [], {}
  progress = tqdm.tqdm(total=c.train.num_steps, initial=first_step, desc=c.mode, unit="step",
                       disable=not lead)
  tick, nan_skips = time.perf_counter(), 0
  try:
    for step in range(first_step, c.train.num_steps):
      local = next(data)
      batch = sharding.global_batch(local, setup.mesh)
      state, metrics = train_step(state, setup.reference, batch, packed_length(setup, local))
      history.append({**metrics, "flops": step_flops(setup, local) * jax.process_count()})
      done = step + 1
      if not bool(metrics["finite"]):
        if c.train.nan_policy == "stop":
          raise NonFiniteLoss(f"step {done}: loss {float(metrics['loss'])}, grad norm "
                              f"{float(metrics['grad_norm'])}; stopping (train.nan_policy)")
        nan_skips += 1
        logging.warning("step %d: non-finite loss skipped (%d so far)", done, nan_skips)
        if nan_skips > c.train.max_nan_skips:
          raise NonFiniteLoss(f"{nan_skips} non-finite steps, more than train.max_nan_skips")
      progress.update(1)
      if done % c.train.log_every == 0 or done == c.train.num_steps:
        seconds = time.perf_counter() - tick
        last = _summary(history)
        last["steps_per_s"] = len(history) / seconds
        last["chars_per_s"] = last["n_chars"] * last["steps_per_s"]
        tflops = last["flops"] * last["steps_per_s"] / n_devices
        last["tflops_per_device"] = tflops / 1e12
        if peak:
          last["mfu"] = tflops / peak
        _write(writer, log, "train", last, done)
        progress.set_postfix(loss=f"{last['loss']:.4f}", chars_s=f"{last['chars_per_s']:.0f}")
        history, tick = [], time.perf_counter()
      eval_metrics = {}
      if done % c.train.eval_every == 0 or done == c.train.num_steps:
        eval_metrics = evaluate(c, eval_step, state, setup, eval_ref_logps_path)
        if eval_metrics:
          _write(writer, log, "eval", eval_metrics, done)
          last.update({f"eval_{k}": v for k, v in eval_metrics.items()})
      if (done % c.train.checkpoint_every == 0 or done == c.train.num_steps or stop["signal"]
          or ckpt.reached_preemption(done)):
        # Only saves with an eval loss compete for "best"; the latest ones are kept regardless.
        ckpt.save(done, state, data, metrics=eval_metrics or None, force=stop["signal"])
      if stop["signal"] or ckpt.reached_preemption(done):
        logging.warning("preempted: checkpoint saved at step %d, exiting", done)
        break
    finished = int(state.step)
    if finished == c.train.num_steps and final_params_step(workdir / FINAL_PARAMS) != finished:
      export_final(setup, state, workdir / FINAL_PARAMS)
  finally:
    ckpt.close()
    progress.close()
    signal.signal(signal.SIGTERM, previous)
    if writer is not None:
      writer.close()
  return last


def export_final(setup: Setup, state: TrainState, directory: epath.Path) -> None:
  """The trained model as a params checkpoint (what `port to-torch` and generation load),
  replacing an export of an earlier step; `FINAL_STEP` is written last."""
  if jax.process_index() == 0 and directory.exists():
    directory.rmtree()
  multihost_utils.sync_global_devices("notagen_jax:final_params_cleared")
  checkpoint.save_params(directory, _model(setup, state.params))
  if jax.process_index() == 0:
    (directory / FINAL_STEP).write_text(json.dumps({"step": int(state.step)}))
  logging.info("final params: %s (python -m notagen_jax.port to-torch %s OUT.pth)", directory,
               directory)


def evaluate(c: ml_collections.ConfigDict, eval_step: Callable, state: TrainState, setup: Setup,
             ref_logps_path: str | None) -> dict[str, float]:
  totals: dict[str, float] = {}
  n = 0
  for batch in eval_batches(c, ref_logps_path):
    metrics = eval_step(state.params, setup.reference, sharding.global_batch(batch, setup.mesh),
                        packed_length(setup, batch))
    metrics.pop("row_logprob", None)
    for k, v in metrics.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    n += 1
  if not n:
    return {}
  if c.mode == "dpo":
    return {k: v / n for k, v in totals.items()}
  nll = totals["nll_sum"] / max(totals["n_chars"], 1.0)
  return {"loss": nll, "bits_per_char": float(losses.bits_per_char(nll)),
          "n_chars": totals["n_chars"]}


def _write(writer, log: storage.JsonLines | None, prefix: str, metrics: dict[str, float],
           step: int) -> None:
  """Console, TensorBoard, and one JSON line per log in workdir/metrics.jsonl (process 0)."""
  logging.info("%s step %d: %s", prefix, step,
               ", ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())))
  if writer is not None:
    for k, v in metrics.items():
      writer.add_scalar(f"{prefix}/{k}", v, step)
    writer.flush()
  if log is not None:
    log.append({"split": prefix, "step": step, **metrics})


def check_inputs(c: ml_collections.ConfigDict) -> None:
  """Every input the run reads exists and fits, checked before any device work."""
  if c.mode == "dpo":
    for field in ("preference_file", "eval_preference_file"):
      path = c.data[field]
      if not path:
        continue
      if not storage.path(path).is_file():
        raise FileNotFoundError(f"config.data.{field}: {path} does not exist")
      chosen, rejected = pipeline.preference_pairs(path)
      if not chosen or not rejected:
        raise ValueError(f"config.data.{field}: {path} needs at least one chosen and one "
                         f"rejected piece (has {len(chosen)} and {len(rejected)})")
  else:
    shards_dir = storage.path(c.data.shards_dir)
    if not (shards_dir / "dataset_info.json").is_file():
      raise FileNotFoundError(
          f"config.data.shards_dir: {shards_dir} is not a built shards dir (no dataset_info.json;"
          " use the path `python -m notagen_jax.prepare` prints after 'shards:')")
  if c.init_checkpoint and not storage.path(c.init_checkpoint).exists():
    raise FileNotFoundError(f"config.init_checkpoint: {c.init_checkpoint} does not exist")
