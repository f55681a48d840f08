"""Several processes as one run: jax.distributed from a config, each process's share of the pieces
of a run, and the barrier after which one process reads what all wrote.

The processes meet through files on the run's storage (a local folder on one machine, a gs:// URL
on a slice), so every work directory of a multi-process run must be reachable from all of them.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from notagen_jax import storage


def initialize(c: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize from `c.distributed` (train's and clamp_dpo's flags), or from a
  TPU pod's / SLURM job's environment; nothing for a single process."""
  d = c.distributed
  if d.coordinator_address:
    # Unset counts (0 / -1) are left to JAX, which reads them from SLURM or the TPU environment.
    jax.distributed.initialize(coordinator_address=d.coordinator_address,
                               num_processes=d.num_processes or None,
                               process_id=d.process_id if d.process_id >= 0 else None)
  elif d.num_processes != 0 or _launched_by_cluster():
    jax.distributed.initialize()  # reads the TPU / SLURM / MPI environment


def _launched_by_cluster() -> bool:
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ and (
      len(os.environ["TPU_WORKER_HOSTNAMES"].split(",")) > 1)


def is_lead() -> bool:
  """Whether this process writes the files shared by all (process 0)."""
  return jax.process_index() == 0


def share(n: int) -> list[int]:
  """This process's items of n: every process_count-th from its index, so that the items of many
  prompts, taken in turn, spread evenly."""
  return list(range(jax.process_index(), n, jax.process_count()))


def barrier(name: str) -> None:
  """Waits until every process gets here (no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class SharedEmbedder:
  """An embedder whose calls are split across processes: each embeds its `share` of the texts and
  the rows meet through .npy files under `exchange`. Every process must make the same calls."""

  def __init__(self, embedder, exchange: storage.PathLike):
    self.embedder = embedder
    self.name = embedder.name
    self.exchange = storage.path(exchange)
    self.calls = 0

  def embed(self, texts) -> np.ndarray:
    texts = list(texts)
    if jax.process_count() == 1:
      return self.embedder.embed(texts)
    folder = self.exchange / f"call_{self.calls}"
    self.calls += 1
    folder.mkdir(parents=True, exist_ok=True)
    mine = share(len(texts))
    if mine:
      rows = np.asarray(self.embedder.embed([texts[i] for i in mine]), np.float32)
      with (folder / f"process_{jax.process_index()}.npy").open("wb") as f:
        np.save(f, rows)
    barrier(f"notagen_jax:embed:{folder}")
    features = None
    for process in range(min(jax.process_count(), len(texts))):
      with (folder / f"process_{process}.npy").open("rb") as f:
        rows = np.load(f)
      if features is None:
        features = np.full((len(texts), rows.shape[1]), np.nan, np.float32)
      features[process::jax.process_count()] = rows
    return features
