"""Planning a run without the hardware: mesh, parameters, memory per device, FLOPs, step time.

`plan(config, devices=..., mesh=...)` resolves the mesh for a named topology (`v5p-64`, `v4-32`,
`v5e-16`, `v6e-8`, `h100x8`, `h200x16`, `a100x8`, `cpu`) by shape arithmetic alone
(`sharding.mesh_shape`), counts parameters exactly from `jax.eval_shape` of the model, and shards
each parameter by the config's logical-axis rules (`sharding.logical_spec` against the mesh's axis
sizes; no devices needed). Activations are an analytic estimate (`activation_bytes`, formula in
its docstring). `compile_step` compiles the real train step ahead of time, for this machine's CPU
devices, for a Cloud TPU slice described by libtpu (`pip install "jax[tpu]"`, no TPU needed, as
MaxText's `train_compile.py`) or for GPU nodes described to XLA:GPU (JAX's CUDA plugin, no GPU
needed), and reports XLA's memory and cost analysis beside the estimates.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import types
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from notagen_jax import config as config_lib
from notagen_jax import model as model_lib
from notagen_jax import sharding
from notagen_jax import trainer

GiB = 2**30
MiB = 2**20
DEFAULT_MFU = 0.45
# libtpu flags that keep XLA:TPU from turning sharded matmuls into collective-matmul loops.
NO_WINDOWED_EINSUM = ("--xla_tpu_enable_windowed_einsum_for_all_gather=false "
                      "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false")


@dataclasses.dataclass(frozen=True)
class Topology:
  """A device slice by name: how many devices, on how many hosts, of which kind."""
  name: str
  n_devices: int  # chips (TPU) or GPUs: what jax.device_count() returns
  n_hosts: int
  device_kind: str  # a trainer.PEAK_FLOPS key; "" when unknown
  hbm_bytes: float  # memory per device; 0 when unknown
  # The share of it a run may allocate (GPUs: JAX's allocator takes XLA_PYTHON_CLIENT_MEM_FRACTION)
  memory_fraction: float = 1.0

  @property
  def peak_flops(self) -> float | None:
    return trainer.PEAK_FLOPS.get(self.device_kind)

  @property
  def usable_bytes(self) -> float:
    return self.hbm_bytes * self.memory_fraction


# name prefix -> (device_kind, HBM bytes per chip, the name counts cores (2 per chip),
# chips per host on multi-host slices, the most chips a single-host slice has)
_TPUS = {
    "v4": ("TPU v4", 32 * GiB, True, 4, 4),
    "v5p": ("TPU v5p", 95 * GiB, True, 4, 4),
    "v5e": ("TPU v5 lite", 16 * GiB, False, 4, 8),
    "v5litepod": ("TPU v5 lite", 16 * GiB, False, 4, 8),
    "v6e": ("TPU v6 lite", 32 * GiB, False, 4, 8),
}
# name prefix -> (device_kind, memory per GPU as nvidia-smi totals it (SXM parts), GPUs per node)
_GPUS = {
    "h100": ("NVIDIA H100", 81559 * MiB, 8),
    "h200": ("NVIDIA H200", 143771 * MiB, 8),
    "a100": ("NVIDIA A100", 81920 * MiB, 8),
}


def topology(name: str) -> Topology:
  """`v5p-64` (64 cores: 32 chips on 8 hosts), `v5e-16`, `h100x8` (8 GPUs), `h100x16` (2 nodes),
  or `cpu` (this machine's jax.devices())."""
  if name == "cpu":
    devices = jax.devices("cpu")
    return Topology("cpu", len(devices), 1, "", 0.0)
  if m := re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name):
    kind, hbm, counts_cores, per_host, single_host = _TPUS[m[1]]
    n = int(m[2])
    if counts_cores and n % 2:
      raise ValueError(f"devices {name!r}: {m[1]} slices count TensorCores, 2 per chip")
    chips = n // 2 if counts_cores else n
    hosts = 1 if chips <= single_host else -(-chips // per_host)
    return Topology(name, chips, hosts, kind, hbm)
  if m := re.fullmatch(r"(h100|h200|a100)x(\d+)", name):
    kind, memory, per_node = _GPUS[m[1]]
    n = int(m[2])
    # JAX's default share unless set (launch/gpu_slurm.sh sets 0.90).
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    try:
      return Topology(name, n, -(-n // per_node), kind, memory, float(fraction))
    except ValueError:
      raise ValueError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction!r}: not a number") from None
  raise ValueError(f"devices {name!r}: expected v4-N, v5p-N, v5e-N, v6e-N, h100xN, h200xN, "
                   "a100xN or cpu")


# topology name prefix libtpu knows each generation by
_TPU_TOPOLOGY_PREFIX = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}


def tpu_devices(t: Topology) -> list[Any]:
  """The devices of TPU slice `t` as libtpu describes them (coordinates, cores per chip), for
  compiling on any host; needs libtpu installed, not a TPU.

  Chip grids follow Cloud TPU's slice shapes: v4 / v5p 3D tori growing 2x2x1, 2x2x2, 2x2x4, 2x4x4,
  4x4x4, ... (wrapped once every side is at least 4), v5e / v6e 2D grids 2x2, 2x4, 4x4, ..., 16x16.
  """
  generation = t.name.split("-")[0]
  three_d = generation in ("v4", "v5p")
  chips = t.n_devices
  if chips & (chips - 1) or chips < (4 if three_d else 1):
    raise ValueError(f"devices {t.name!r}: compiling needs a power-of-two slice "
                     f"({'at least 4 chips' if three_d else 'v5e-1, v5e-4, v5e-8, ...'})")
  dims = [2, 2, 1] if three_d else ([2, 2] if chips >= 4 else [1, 1])
  while math.prod(dims) < chips:
    smallest = min(dims)
    last = max(i for i, d in enumerate(dims) if d == smallest)
    dims[last] *= 2
  # What libtpu would otherwise ask a TPU VM's metadata server for (warning at length where there
  # is none), and leave to a training run on the same VM the chips' lockfile it would take.
  for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", t.name),
                      ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                      ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(name, value)
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{_TPU_TOPOLOGY_PREFIX[generation]}:"
        + "x".join(map(str, dims)), chip_config_name="megacore" if three_d else "default",
        chips_per_host_bounds=(2, 2, 1) if chips >= 4 else (1, 1, 1), num_slices=1,
        wrap=(three_d and min(dims) >= 4,) * 3)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"devices {t.name!r}: libtpu could not describe the slice ({error}); "
                     "install it with pip install \"jax[tpu]==" + jax.__version__ + "\"") from None
  return list(desc.devices)


# What XLA:GPU compiles for, per GPU (the datasheets' SXM parts): SMs, compute capability, memory
# bandwidth (bytes/s), L2 bytes, boost clock (GHz), shared memory per SM and per block (opt-in),
# FP32 lanes per SM. Memory per GPU is _GPUS'.
_GPU_SPECS = {
    "h100": (132, 9, 3.35e12, 50 * MiB, 1.98, 228 * 2**10, 227 * 2**10, 128),
    "h200": (132, 9, 4.8e12, 50 * MiB, 1.98, 228 * 2**10, 227 * 2**10, 128),
    "a100": (108, 8, 2.039e12, 40 * MiB, 1.41, 164 * 2**10, 163 * 2**10, 64),
}


def _gpu_generation(t: Topology) -> str | None:
  """The GPU's name in `_GPUS` ("h100" for h100x16); None for a TPU slice or cpu."""
  return next((g for g in _GPUS if t.name.startswith(g + "x")), None)


def gpu_memory_bandwidth(t: Topology) -> float:
  """Bytes per second each of GPU nodes `t`'s GPUs reads or writes at most (the datasheet's)."""
  return _GPU_SPECS[_gpu_generation(t)][2]


def gpu_devices(t: Topology) -> list[Any]:
  """The devices of GPU nodes `t` as XLA:GPU describes them from the GPU's specifications, for
  compiling on any host; needs JAX's CUDA plugin but no GPU or CUDA libraries (`pip install
  "jax[cuda12-local]"`). cuDNN 9.8 (the oldest JAX's CUDA 12 plugin takes) and CUDA 12.8.

  Each node (8 GPUs) is one NVLink domain; XLA compiles without autotuning, so matmul tilings
  may differ from a run's, not the program's buffers.
  """
  generation = _gpu_generation(t)
  _, _, per_node = _GPUS[generation]
  sms, capability, bandwidth, l2, clock, smem_per_sm, smem_per_block, lanes = _GPU_SPECS[generation]
  target = f"""
    gpu_device_info {{
      threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
      shared_memory_per_core: {smem_per_sm} shared_memory_per_block_optin: {smem_per_block}
      threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: {lanes}
      block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
      memory_bandwidth: {int(bandwidth)} l2_cache_size: {l2} clock_rate_ghz: {clock}
      device_memory_size: {int(t.hbm_bytes)} registers_per_core_limit: 65536
      registers_per_block_limit: 65536 cuda_compute_capability {{ major: {capability} }}
    }}
    platform_name: "CUDA"
    dnn_version_info {{ major: 9 minor: 8 }} runtime_version {{ major: 12 minor: 8 }}
    device_description_str: "{t.device_kind}"
  """
  nodes = -(-t.n_devices // per_node)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc(platform="cuda", target_config=target,
                                        topology=f"{nodes}x1x{min(t.n_devices, per_node)}")
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"devices {t.name!r}: XLA could not describe the GPUs ({error}); compiling "
                     "for GPUs on this host needs JAX's CUDA plugin, not a GPU: pip install "
                     f"\"jax[cuda12-local]=={jax.__version__}\"") from None
  return list(desc.devices)[:t.n_devices]


def fake_mesh(shape: Sequence[int]) -> Any:
  """What `sharding.logical_spec` reads of a mesh (its axis sizes), without devices."""
  return types.SimpleNamespace(shape=dict(zip(sharding.MESH_AXES, shape)))


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def shard_bytes(state: Any, mesh_shape: Sequence[int], rules: sharding.Rules) -> int:
  """Bytes one device holds of `state`, sharded as `sharding.state_shardings` would shard it."""
  mesh = fake_mesh(mesh_shape)
  total = 0
  for leaf in jax.tree.leaves(state, is_leaf=_is_variable):
    names = leaf.get_metadata().get("out_sharding") if _is_variable(leaf) else None
    spec = sharding.logical_spec(names, leaf.shape, mesh, rules) if names else ()
    split = math.prod(math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
                      for axes in spec if axes)
    total += math.prod(leaf.shape) // split * _itemsize(leaf.dtype)
  return total


def _itemsize(dtype: Any) -> int:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return 8  # the default threefry key: two uint32
  return jnp.dtype(dtype).itemsize


def abstract_state(c: ml_collections.ConfigDict) -> tuple[Any, Any, Any]:
  """(graphdef, rest, TrainState) of the config as ShapeDtypeStructs, as trainer.build_setup
  makes them (same init functions, same optimizer)."""
  cfg = trainer.model_config(c)
  tx, _ = trainer.make_optimizer(c)

  def init(key):
    graphdef, params, rest = nnx.split(model_lib.NotaGen(cfg, nnx.Rngs(params=key)), nnx.Param,
                                       ...)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), rng=key)
    return graphdef, rest, state

  return jax.eval_shape(init, jax.random.key(c.seed))


def count_params(params: Any) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def activation_bytes(cfg: model_lib.ModelConfig, rows: int, patch_length: int,
                     remat: bool) -> dict[str, float]:
  """Bytes of activations live at the backward pass's peak on a device holding `rows` pieces.

  An estimate of the program as written, without fusion: XLA:CPU compiles it within 20% of this;
  XLA:TPU fuses the one-hot inputs, the softmax and the elementwise chains away and needs 2-3x
  less (and rematerializes on its own near the HBM limit), so `compile_step`'s figure is the one
  that decides whether a TPU or GPU run fits. With s the compute dtype's bytes, H hidden, N heads,
  V vocab, P patch size, and d = 1 when dropout is on (else 0), a GPT-2 block over T tokens with S
  keys saves per token
      16 H s        (ln_1 in, ln_1 out, q, k, v, attention out, ln_2 in, ln_2 out, fc 4H, gelu 4H)
    + 2 H 4 d       (two residual dropout masks, kept as the uint32 random bits they come from)
    + N S (4 + d (4 + s))   (float32 softmax probs; with dropout its bits and the dropped probs)
  The patch level runs T = S = L (patch_length) on each row, the char level T = S = P on each of
  the row's K pairs (K = patch_sampling, else L - 1; char packing is not counted). Outside the
  blocks, per token: patch level the one-hot patch P V s, the float32 embedding sum 4 H, the input
  dropout bits 4 H d, ln_f in H s; char level the one-hot char and position inputs (V + P + 1) s,
  the input dropout bits 4 H d, ln_f in and out 2 H s, float32 log-softmax and one-hot labels
  2 V 4. While a block's backward runs, its cotangents are live too: about one more saved set of
  the largest block ("backward").
  With remat each block keeps only its input (T H s) and the block under backward has its saved
  set recomputed ("recompute") besides its cotangents.
  """
  s = jnp.dtype(cfg.dtype).itemsize
  d = 1 if cfg.dropout > 0 else 0
  h, n, v, p = cfg.hidden, cfg.heads, cfg.vocab, cfg.patch_size
  pairs = cfg.patch_sampling if 0 < cfg.patch_sampling < patch_length - 1 else patch_length - 1

  def block(tokens: int, keys: int) -> float:
    return tokens * (16 * h * s + 8 * h * d + n * keys * (4 + d * (4 + s)))

  patch_tokens, char_tokens = rows * patch_length, rows * pairs * p
  patch_block, char_block = block(patch_tokens, patch_length), block(char_tokens, p)
  largest = max(patch_block, char_block)
  if remat:
    patch_blocks = cfg.patch_layers * patch_tokens * h * s
    char_blocks = cfg.char_layers * char_tokens * h * s
    recompute = largest
  else:
    patch_blocks, char_blocks = cfg.patch_layers * patch_block, cfg.char_layers * char_block
    recompute = 0.0
  patch_other = patch_tokens * (p * v * s + 4 * h + 4 * h * d + h * s)
  char_other = char_tokens * ((v + p + 1) * s + 4 * h * d + 2 * h * s + 2 * v * 4)
  out = {"patch_blocks": patch_blocks, "char_blocks": char_blocks, "recompute": recompute,
         "backward": largest, "patch_other": patch_other, "char_other": char_other}
  out["total"] = sum(out.values())
  return out


@dataclasses.dataclass
class Plan:
  config: ml_collections.ConfigDict
  topology: Topology | None
  mesh_shape: tuple[int, ...]
  n_params: int
  param_bytes: int  # per device, each of params / grads
  opt_bytes: int  # per device: AdamW mu + nu (+ accumulated grads with grad_accum_steps > 1,
  # + the DPO reference params when they are not precomputed)
  activations: dict[str, float]  # per device, without remat
  activations_remat: dict[str, float]
  rows_per_device: int
  flops_per_step: float
  peak_flops: float | None
  mfu: float
  compiled: Compiled | None = None

  @property
  def n_devices(self) -> int:
    return math.prod(self.mesh_shape)

  def total_bytes(self, remat: bool) -> float:
    activations = self.activations_remat if remat else self.activations
    return 2 * self.param_bytes + self.opt_bytes + activations["total"]

  @property
  def step_seconds(self) -> float | None:
    if not self.peak_flops:
      return None
    return self.flops_per_step / (self.n_devices * self.peak_flops * self.mfu)


def parse_mesh(text: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(x) for x in text.split(","))
  except ValueError:
    raise ValueError(f"mesh {text!r}: expected data,fsdp,tensor sizes, e.g. 2,4,1") from None
  if len(shape) != len(sharding.MESH_AXES):
    raise ValueError(f"mesh {text!r}: one size per axis {sharding.MESH_AXES}")
  return shape


def plan(c: ml_collections.ConfigDict, devices: str | None = None,
         mesh: Sequence[int] | None = None, mfu: float = DEFAULT_MFU,
         compile: bool | None = None) -> Plan:  # pylint: disable=redefined-builtin
  """The plan of config `c` on `devices` (a topology name) and/or `mesh` (may hold one -1).

  `compile` (default: only for `cpu`) also compiles the real train step for the devices: this
  machine's CPU, a TPU slice through libtpu or GPU nodes through JAX's CUDA plugin.
  """
  if devices is None and mesh is None:
    devices = "cpu"
  topo = topology(devices) if devices else None
  shape = tuple(mesh) if mesh is not None else tuple(c.mesh.shape)
  if topo is not None:
    resolved = sharding.mesh_shape(shape, topo.n_devices)
  else:
    if -1 in shape:
      raise ValueError(f"mesh {shape} has a -1: give --devices to resolve it")
    resolved = sharding.mesh_shape(shape, math.prod(shape))
  dp = math.prod(resolved[sharding.MESH_AXES.index(a)] for a in sharding.BATCH_AXES)
  c = config_lib.with_global_batch(c, dp)
  rules = [tuple(rule) for rule in c.mesh.logical_axis_rules]
  cfg = trainer.model_config(c)
  _, _, state = abstract_state(c)
  param_bytes = shard_bytes(state.params, resolved, rules)
  opt_bytes = shard_bytes(state.opt_state, resolved, rules)
  rows = c.data.batch_size // dp
  pieces = 2 if c.mode == "dpo" else 1  # DPO: chosen and rejected of each pair
  flops = 3 * trainer.forward_flops(cfg, c.model.patch_length) * c.data.batch_size * pieces
  # A DPO reference recomputed at every step is a second copy of the params.
  reference = param_bytes if c.mode == "dpo" and not c.dpo.precompute_reference else 0
  peak = c.peak_flops_per_device or (topo.peak_flops if topo else None)
  result = Plan(c, topo, resolved, count_params(state.params), param_bytes, opt_bytes + reference,
                activation_bytes(cfg, rows * pieces, c.model.patch_length, remat=False),
                activation_bytes(cfg, rows * pieces, c.model.patch_length, remat=True),
                rows, flops, peak, mfu)
  if compile is None:
    compile = topo is not None and topo.name == "cpu"
  if compile:
    if topo is None:
      raise ValueError("compiling needs --devices (cpu, a TPU slice or GPU nodes), not a --mesh "
                       "alone")
    result.compiled = compile_step(c, resolved, topo)
  return result


@dataclasses.dataclass(frozen=True)
class Compiled:
  """The real train step compiled for a target: XLA's figures per device."""
  target: str  # "cpu" or the topology name
  seconds: float  # lowering + XLA compilation
  memory: dict[str, float]  # argument / output / alias / temp / peak bytes
  # XLA's cost analysis of one step; None where the backend gives none or the layers are scanned.
  flops: float | None
  # While loops XLA:TPU made of sharded matmuls and their collectives (windowed einsums, on large
  # fsdp axes): the cost analysis counts each body once, so `flops` is then a lower bound.
  windowed_loops: int = 0


def _train_batch(c: ml_collections.ConfigDict, cfg: model_lib.ModelConfig) -> dict[str, Any]:
  """The global batch the trainer feeds one step, as ShapeDtypeStructs."""
  rows, length = c.data.batch_size, c.model.patch_length

  def ints(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)

  if c.mode == "dpo":
    batch = {name: ints(rows, length, cfg.patch_size) for name in ("chosen", "rejected")}
    batch |= {f"{name}_masks": ints(rows, length) for name in ("chosen", "rejected")}
    if c.dpo.precompute_reference:
      batch |= {f"ref_{name}_logp": jax.ShapeDtypeStruct((rows,), jnp.float32)
                for name in ("chosen", "rejected")}
    return batch
  return {"patches": ints(rows, length, cfg.patch_size), "masks": ints(rows, length)}


def lower_step(c: ml_collections.ConfigDict, mesh_shape: Sequence[int],
               target: Topology) -> jax.stages.Lowered:
  """The trainer's jitted train step (pre-training, fine-tuning or DPO, with `c`'s remat and layer
  settings) lowered for `target`'s devices without running or allocating anything: this
  machine's CPU devices, a TPU slice through libtpu or GPU nodes through JAX's CUDA plugin."""
  if target.name == "cpu":
    devices = jax.devices("cpu")
  else:
    devices = gpu_devices(target) if _gpu_generation(target) else tpu_devices(target)
  if len(devices) < math.prod(mesh_shape):
    raise ValueError(f"mesh {tuple(mesh_shape)} needs {math.prod(mesh_shape)} devices, "
                     f"{target.name} has {len(devices)}")
  mesh = sharding.make_mesh(mesh_shape, devices[:math.prod(mesh_shape)])
  rules = [tuple(rule) for rule in c.mesh.logical_axis_rules]
  graphdef, rest, state = abstract_state(c)
  # The non-trainable rest (one unused [1, H] tensor) is closed over by the step: make it real.
  rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)
  tx, schedule = trainer.make_optimizer(c)
  cfg = trainer.model_config(c)
  state_shardings = sharding.state_shardings(state, mesh, rules)
  reference = state.params if c.mode == "dpo" and not c.dpo.precompute_reference else None
  setup = trainer.Setup(c, mesh, cfg, graphdef, rest, state, state_shardings, reference, tx,
                        schedule)
  # The longest packed char rows a step can get: the variant that needs the most memory.
  packed_len = (c.model.patch_length - 1) * cfg.patch_size if cfg.char_packing else None
  return trainer.make_train_step(setup).lower(state, reference, _train_batch(c, cfg), packed_len)


def compile_step(c: ml_collections.ConfigDict, mesh_shape: Sequence[int],
                 target: Topology) -> Compiled:
  """`lower_step` compiled: XLA's memory and cost analysis of the step on `target`."""
  start = time.perf_counter()
  lowered = lower_step(c, mesh_shape, target)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    # XLA:TPU refuses to compile a program that cannot fit; say so as check_fits would.
    raise ValueError(f"does not fit on {target.name}: {str(error).splitlines()[0]}; try "
                     f"{_FIT_ADVICE}") from None
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  memory = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
  memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = cost.get("flops") if cost else None
  windowed = len(re.findall(r" while\(.*condition=%[\w.-]*windowed_dot_general",
                            compiled.as_text()))
  # XLA's cost analysis counts a scanned layer's body once: no figure for the whole step then.
  whole = flops and flops > 0 and not c.model.scan_layers
  return Compiled(target.name, seconds, memory, flops if whole else None, windowed)


_FIT_ADVICE = ("--config.model.remat=True, a larger fsdp axis (--mesh) or fewer rows per device "
               "(--config.data.per_device_batch_size)")


def check_fits(p: Plan) -> None:
  """Raises ValueError when the compiled step needs more memory per device than the target has."""
  t = p.topology
  if p.compiled is None or t is None or not t.hbm_bytes:
    return
  peak = p.compiled.memory["peak"]
  if peak > t.usable_bytes:
    share = (f" for JAX (XLA_PYTHON_CLIENT_MEM_FRACTION {t.memory_fraction:g})"
             if t.memory_fraction < 1 else "")
    raise ValueError(
        f"does not fit: the compiled step needs {_bytes(peak)} per device, {t.name} has "
        f"{_bytes(t.usable_bytes)}{share}; try {_FIT_ADVICE}")


def _bytes(x: float) -> str:
  for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
    if x >= scale:
      return f"{x / scale:.2f} {unit}"
  return f"{x:.0f} B"


def format_plan(p: Plan) -> str:
  c = p.config
  cfg = trainer.model_config(c)
  t = p.topology
  mesh = " ".join(f"{a}={s}" for a, s in zip(sharding.MESH_AXES, p.mesh_shape))
  if t is None:
    where = f"mesh of {p.n_devices} devices (kind not given)"
  elif t.name == "cpu":
    where = f"cpu: {t.n_devices} local CPU devices"
  else:
    where = (f"{t.name}: {t.n_devices} x {t.device_kind} on {t.n_hosts} host(s), "
             f"{_bytes(t.hbm_bytes)} each")
    if t.memory_fraction < 1:
      where += (f", {_bytes(t.usable_bytes)} for JAX (XLA_PYTHON_CLIENT_MEM_FRACTION "
                f"{t.memory_fraction:g})")
  hosts = t.n_hosts if t else 1
  lines = [
      f"plan        {c.mode} {c.model.size} (patch_length {c.model.patch_length}, "
      f"{cfg.patch_layers}+{cfg.char_layers} layers, hidden {cfg.hidden}, compute {cfg.dtype})",
      f"devices     {where}",
      f"mesh        {mesh} (config.mesh.shape {tuple(c.mesh.shape)})",
      f"batch       {c.data.batch_size} rows global, {p.rows_per_device} per device, "
      f"{c.data.batch_size // hosts} per host",
      f"parameters  {p.n_params:,} ({p.n_params / 1e6:.1f}M)",
      f"per device  params {_bytes(p.param_bytes)} + grads {_bytes(p.param_bytes)} + "
      f"optimizer state {_bytes(p.opt_bytes)} = {_bytes(2 * p.param_bytes + p.opt_bytes)}",
  ]
  for label, acts, remat in (("no remat", p.activations, False),
                             ("remat", p.activations_remat, True)):
    total = p.total_bytes(remat)
    fits = (f" of {_bytes(t.usable_bytes)} ({total / t.usable_bytes:.0%})" if t and t.hbm_bytes
            else "")
    lines.append(f"{label:<11} activations {_bytes(acts['total'])} (patch blocks "
                 f"{_bytes(acts['patch_blocks'])}, char blocks {_bytes(acts['char_blocks'])}"
                 + (f", one block recomputed {_bytes(acts['recompute'])}" if remat else "")
                 + f", backward {_bytes(acts['backward'])}"
                 + f"); total {_bytes(total)}{fits}")
  if p.compiled:
    x = p.compiled
    m, remat = x.memory, c.model.remat
    estimate = p.total_bytes(remat)
    of = f" of {_bytes(t.usable_bytes)} ({m['peak'] / t.usable_bytes:.0%})" if t.hbm_bytes else ""
    layers = "scanned" if c.model.scan_layers else "unrolled"
    lines.append(f"compiled    for {x.target} ({'remat' if remat else 'no remat'}, layers "
                 f"{layers}) in {x.seconds:.1f} s: peak {_bytes(m['peak'])} per device{of} "
                 f"(arguments {_bytes(m['argument'])}, temp {_bytes(m['temp'])}); estimate / "
                 f"compiled {estimate / m['peak']:.2f}")
    if c.model.scan_layers:
      lines.append("xla flops   n/a: XLA's cost analysis counts a scanned layer once")
    elif x.flops:
      per_device = p.flops_per_step / p.n_devices
      bound = ">= " if x.windowed_loops else ""
      lines.append(f"xla flops   {bound}{x.flops:.4g} per device per step; estimate "
                   f"{per_device:.4g} (estimate / xla {per_device / x.flops:.2f})")
      if x.windowed_loops:
        lines.append(f"            (XLA counts each of its {x.windowed_loops} collective-matmul "
                     "loops once: windowed einsums over the fsdp axis)")
    if x.windowed_loops:
      lines.append("note        the collective-matmul loops overlap the fsdp all-gathers with the "
                   "matmuls but keep their float32 outputs unfused, which costs memory; "
                   f"LIBTPU_INIT_ARGS='{NO_WINDOWED_EINSUM}' compiles without them")
  lines.append(f"flops/step  {p.flops_per_step:.4g} (3 x forward x {c.data.batch_size} rows"
               + (" x 2 for chosen + rejected" if c.mode == "dpo" else "") + ")")
  if p.step_seconds:
    lines.append(f"step time   {p.step_seconds:.4g} s at MFU {p.mfu:g} of "
                 f"{p.peak_flops / 1e12:g} TFLOP/s x {p.n_devices} devices "
                 f"({1 / p.step_seconds:.3g} steps/s)")
  else:
    lines.append("step time   n/a: peak FLOP/s unknown for these devices "
                 "(set --config.peak_flops_per_device)")
  return "\n".join(lines)
