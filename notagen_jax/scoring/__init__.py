"""Music scorers for CLaMP-DPO: each embeds ABC pieces; preferences.py turns embeddings into choices."""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Embedder(Protocol):
  """Maps ABC texts (un-reduced, interleaved, as written by the sampler) to feature vectors.

  `embed` returns float32 [len(texts), dim]; a piece that cannot be read gets a row of NaN, so the
  caller counts it and keeps the others.
  """
  name: str

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    ...
