"""The training config: defaults as in the paper, and validation before any work.

Config files in `configs/` call `base_config(mode, size)` and adjust; `validate` checks every field
a run uses and names the one that is wrong, before a device is touched or a file is read.
"""

from __future__ import annotations

import ml_collections

from notagen_jax import model as model_lib
from notagen_jax import sharding
from notagen_jax.data import pipeline

MODES = ("pretrain", "finetune", "dpo")
DPO_LOSSES = ("dpo_positive", "dpo", "ipo")
SCHEDULES = ("constant", "cosine")
NAN_POLICIES = ("stop", "skip")
DTYPES = ("float32", "bfloat16")
# The original's learning rates: pre-training 2e-4 (small) / 1e-4 (medium, large), fine-tuning
# 1e-5, DPO 1e-6.
PRETRAIN_LR = {"tiny": 2e-4, "small": 2e-4, "medium": 1e-4, "large": 1e-4}


def base_config(mode: str, size: str = "small") -> ml_collections.ConfigDict:
  if mode not in MODES:
    raise ValueError(f"mode {mode!r} is not one of {MODES}")
  if size not in model_lib.SIZES:
    raise ValueError(f"size {size!r} is not one of {tuple(model_lib.SIZES)}")
  c = ml_collections.ConfigDict()
  c.mode = mode
  c.workdir = ""  # also settable with --workdir
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.size = size
  c.model.patch_length = model_lib.SIZES[size][0]
  c.model.dtype = "float32"
  c.model.remat = False
  # Each decoder's blocks compiled once and scanned over layers (compile time flat in depth); the
  # numbers and the checkpoints' per-layer params are the same either way. Best with remat: without
  # it a scanned step keeps more activations (model.SCAN_SAVED).
  c.model.scan_layers = False
  # DPO compares the policy's log-probs with the reference's: both need the same dropout, and the
  # precomputed reference has none (see c.dpo below).
  c.model.dropout = 0.0 if mode == "dpo" else 0.1
  c.model.patch_sampling = 0
  c.model.char_packing = False

  # An original NotaGen .pth / .safetensors (converted on the fly) or one of our checkpoints.
  c.init_checkpoint = ""

  c.data = ml_collections.ConfigDict()
  c.data.shards_dir = ""  # the versioned dir that `prepare` prints ("shards: ...")
  c.data.eval_split = "eval"
  # The batch is global (over all processes and devices) or, with batch_size 0, per
  # data-parallel device (`per_device_batch_size` rows on each, so any slice splits it).
  c.data.batch_size = 8
  c.data.per_device_batch_size = 0
  c.data.key_sampling = "uniform" if mode == "pretrain" else "nearby"
  c.data.drop_prompt = mode == "pretrain"
  c.data.stream_cut = True
  c.data.num_workers = 0
  c.data.num_threads = 2
  c.data.preference_file = ""  # DPO: {"chosen": [...], "rejected": [...]}
  c.data.eval_preference_file = ""

  c.optimizer = ml_collections.ConfigDict()
  lr = {"pretrain": PRETRAIN_LR[size], "finetune": 1e-5, "dpo": 1e-6}[mode]
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = 0 if mode == "dpo" else 1000
  c.optimizer.schedule = "constant"
  c.optimizer.b1 = 0.9  # torch.optim.AdamW's defaults, which the original uses
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  c.optimizer.clip_norm = 1.0 if mode == "dpo" else 0.0  # 0: no clipping
  c.optimizer.grad_accum_steps = 1

  c.dpo = ml_collections.ConfigDict()
  c.dpo.loss = "dpo_positive"
  c.dpo.beta = 0.1
  c.dpo.lam = 10.0
  # Reference log-probs computed once (dropout off) and read with the pairs; the original
  # recomputes them at every step with dropout on (set both False to reproduce that).
  c.dpo.precompute_reference = True
  c.dpo.reference_dropout = False

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = {"pretrain": 100_000, "finetune": 20_000, "dpo": 10_000}[mode]
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.train.eval_batches = 20
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.nan_policy = "stop"
  c.train.max_nan_skips = 10

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); -1 fills with the remaining devices
  c.mesh.logical_axis_rules = tuple(sharding.DEFAULT_RULES)

  c.peak_flops_per_device = 0.0  # 0: look the device kind up in trainer.PEAK_FLOPS

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # empty: auto-detect (TPU pod, SLURM) or single process
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  return c


def global_batch_size(c: ml_collections.ConfigDict, data_parallel: int) -> int:
  """Rows per step over the whole mesh, of which `data_parallel` devices split the batch."""
  if c.data.per_device_batch_size:
    return c.data.per_device_batch_size * data_parallel
  if c.data.batch_size % data_parallel:
    raise ValueError(f"config.data.batch_size {c.data.batch_size} does not split over the "
                     f"{data_parallel} data-parallel devices (set data.per_device_batch_size "
                     "instead, with data.batch_size=0)")
  return c.data.batch_size


def with_global_batch(c: ml_collections.ConfigDict,
                      data_parallel: int) -> ml_collections.ConfigDict:
  """A copy of `c` whose data.batch_size is the global batch over `data_parallel` devices."""
  batch_size = global_batch_size(c, data_parallel)
  c = ml_collections.ConfigDict(c.to_dict())
  c.data.batch_size, c.data.per_device_batch_size = batch_size, 0
  return c


def _check(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ValueError(f"config.{field}: {message}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first wrong field."""
  _check(c.mode in MODES, "mode", f"{c.mode!r} is not one of {MODES}")
  _check(bool(c.workdir), "workdir", "is empty (set --workdir or config.workdir)")
  try:
    model_lib.shape_of(c.model.size)
  except ValueError as error:
    _check(False, "model.size", str(error))
  _check(c.model.patch_length > 1, "model.patch_length", f"{c.model.patch_length} must be > 1")
  _check(c.model.dtype in DTYPES, "model.dtype", f"{c.model.dtype!r} is not one of {DTYPES}")
  _check(0 <= c.model.dropout < 1, "model.dropout", f"{c.model.dropout} not in [0, 1)")
  _check(c.model.patch_sampling >= 0, "model.patch_sampling", "must be >= 0")
  d = c.data
  _check(d.batch_size >= 0 and d.per_device_batch_size >= 0, "data.batch_size",
         "batch sizes must be >= 0")
  _check((d.batch_size > 0) != (d.per_device_batch_size > 0), "data.batch_size",
         f"set one of data.batch_size (global; now {d.batch_size}) and "
         f"data.per_device_batch_size (now {d.per_device_batch_size}), the other to 0")
  _check(c.data.key_sampling in pipeline.KEY_SAMPLING, "data.key_sampling",
         f"{c.data.key_sampling!r} is not one of {pipeline.KEY_SAMPLING}")
  if c.mode == "dpo":
    _check(bool(c.data.preference_file), "data.preference_file", "DPO needs a preference file")
    _check(bool(c.init_checkpoint), "init_checkpoint",
           "DPO starts policy and reference from a checkpoint")
    _check(c.dpo.loss in DPO_LOSSES, "dpo.loss", f"{c.dpo.loss!r} is not one of {DPO_LOSSES}")
    _check(c.dpo.beta > 0, "dpo.beta", f"{c.dpo.beta} must be > 0")
    _check(c.dpo.lam >= 0, "dpo.lam", f"{c.dpo.lam} must be >= 0")
    _check(not (c.dpo.precompute_reference and c.dpo.reference_dropout), "dpo.reference_dropout",
           "precomputed reference log-probs are deterministic; turn one of the two off")
    # A policy with dropout scores a piece hundreds of nats below a reference without it, and
    # DPO-Positive's penalty takes that gap for a policy that got worse.
    _check(c.model.dropout == 0 or c.dpo.reference_dropout, "model.dropout",
           f"{c.model.dropout} while the reference log-probs have no dropout: set model.dropout=0 "
           "or, as the original, dpo.reference_dropout=True and dpo.precompute_reference=False")
  else:
    _check(bool(c.data.shards_dir), "data.shards_dir", "is empty")
  if c.mode == "finetune":
    _check(bool(c.init_checkpoint), "init_checkpoint", "fine-tuning starts from a checkpoint")
  o = c.optimizer
  _check(o.learning_rate > 0, "optimizer.learning_rate", f"{o.learning_rate} must be > 0")
  _check(o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
  _check(o.schedule in SCHEDULES, "optimizer.schedule", f"{o.schedule!r} not in {SCHEDULES}")
  _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optimizer.b1/b2", "must be in [0, 1)")
  _check(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
  _check(o.clip_norm >= 0, "optimizer.clip_norm", "must be >= 0 (0: off)")
  _check(o.grad_accum_steps >= 1, "optimizer.grad_accum_steps", "must be >= 1")
  t = c.train
  _check(t.num_steps > 0, "train.num_steps", f"{t.num_steps} must be > 0")
  for field in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    _check(t[field] > 0, f"train.{field}", f"{t[field]} must be > 0")
  _check(t.nan_policy in NAN_POLICIES, "train.nan_policy",
         f"{t.nan_policy!r} is not one of {NAN_POLICIES}")
  _check(len(c.mesh.shape) == 3, "mesh.shape", f"{tuple(c.mesh.shape)} needs (data, fsdp, tensor)")
  for name, axes in c.mesh.logical_axis_rules:
    for axis in (axes,) if isinstance(axes, str) else (axes or ()):
      _check(axis in sharding.MESH_AXES, "mesh.logical_axis_rules",
             f"rule {name!r} names mesh axis {axis!r}, not one of {sharding.MESH_AXES}")
