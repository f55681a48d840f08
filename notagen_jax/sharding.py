"""Device mesh, logical-axis rules, and global batches.

Parameters carry logical axis names (model.py); a config's `logical_axis_rules` maps each name to
mesh axes, MaxText-style. A rule applies to a dimension only when the mesh axes are not already
used by another dimension of the same tensor and divide the dimension's size; otherwise the next
rule for that name is tried, and with none left the dimension is replicated. So one rule set
serves the tiny test model and the large one.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Activations' batch dimension goes over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("patch_in", "tensor"),
    ("vocab", None),
    ("kv", None),
    ("position", None),
    ("layers", None),  # blocks stacked for `scan_layers`: each device keeps its slice of each
)


def mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry so that the product is n_devices; checks the rest."""
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {tuple(shape)} must have one size per axis {MESH_AXES}")
  if sum(1 for s in shape if s == -1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {tuple(shape)}: sizes must be positive or -1")
  known = math.prod(s for s in shape if s != -1)
  if n_devices % known:
    raise ValueError(f"mesh shape {tuple(shape)} does not divide {n_devices} devices")
  resolved = tuple(n_devices // known if s == -1 else s for s in shape)
  if math.prod(resolved) != n_devices:
    raise ValueError(f"mesh shape {tuple(shape)} uses {math.prod(resolved)} of {n_devices} devices")
  return resolved


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  resolved = mesh_shape(shape, len(devices))
  # Auto axes: shardings are given at jit boundaries and XLA propagates them inside.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == jax.devices():
    # Lays out the axes over the physical topology (ICI/NVLink first for the inner axes).
    return jax.make_mesh(resolved, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(resolved), MESH_AXES, axis_types=axis_types)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: Rules) -> PartitionSpec:
  """The PartitionSpec of a tensor with these logical dimension names, under `rules`."""
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    chosen = None
    for rule_name, axes in rules:
      if rule_name != name or axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if not axes or used & set(axes) or size % math.prod(mesh.shape[a] for a in axes):
        continue
      chosen = axes[0] if len(axes) == 1 else axes
      used.update(axes)
      break
    spec.append(chosen)
  return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for every array of a pytree of nnx Variables and plain arrays.

  The result has the same structure as `state` (a Variable keeps its place, its value becomes the
  sharding), so it serves as jit's in/out_shardings and as an Orbax restore target alike.
  Variables with `out_sharding` names follow the rules; everything else is replicated.
  """
  def sharding_of(leaf: Any) -> Any:
    if _is_variable(leaf):
      names = leaf.get_metadata().get("out_sharding")
      spec = logical_spec(names, leaf.shape, mesh, rules) if names else PartitionSpec()
      return leaf.replace(value=NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(sharding_of, state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading dimension over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded over the data-parallel axes."""
  return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)),
                                                       np.asarray(value))
          for name, value in local.items()}


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh) -> Iterator[None]:
  """While tracing inside this context, `constrain_batch` shards activations over `mesh`."""
  token = _ACTIVATION_MESH.set(mesh)
  try:
    yield
  finally:
    _ACTIVATION_MESH.reset(token)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins an activation's leading (batch) dimension to the data-parallel axes.

  Without it XLA may follow the fsdp-sharded weights instead and run the whole global batch on
  every device. A no-op outside `activation_mesh` (single-device use, tests of the model alone).
  """
  mesh = _ACTIVATION_MESH.get()
  if mesh is None or x.shape[0] % data_parallel_size(mesh):
    return x
  spec = PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
