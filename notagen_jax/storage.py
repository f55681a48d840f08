"""Paths a run reads and writes, local or in an object store (`gs://...`), as etils epath.

Object stores have neither directories nor appends: logs that grow are rewritten whole there, and
nothing is ever created locally for a remote URL.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import tensorboardX
from etils import epath
from tensorboardX import record_writer

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  return "://" in os.fspath(path)


def path(value: PathLike) -> epath.Path:
  """`value` as an epath; a local one made absolute (Orbax and worker processes need that)."""
  if is_remote(value):
    return epath.Path(value)
  return epath.Path(os.path.abspath(os.fspath(value)))


def sha256(file: PathLike) -> str:
  digest = hashlib.sha256()
  with path(file).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def read_json(file: PathLike) -> Any | None:
  """The JSON in `file`, or None when there is none (or it is not JSON: a cut-off write)."""
  file = path(file)
  if not file.exists():
    return None
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError:
    return None


class JsonLines:
  """A JSON-lines log that grows: appended locally, rewritten whole in an object store."""

  def __init__(self, file: PathLike):
    self._path = path(file)
    self._remote = is_remote(file)
    self._text = self._path.read_text() if self._remote and self._path.exists() else ""

  def append(self, row: dict[str, Any]) -> None:
    line = json.dumps(row) + "\n"
    if self._remote:
      self._text += line
      self._path.write_text(self._text)
    else:
      self._path.parent.mkdir(parents=True, exist_ok=True)
      with self._path.open("a") as f:
        f.write(line)


class _ObjectRecordWriter:
  """tensorboardX's event file as an object, rewritten at each flush (as its own GCS writer
  does) but through epath, so that one storage layer (and its credentials) serves the run."""

  def __init__(self, file: str):
    self._path = epath.Path(file)
    self._buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    self._path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _ObjectRecordWriterFactory:

  def open(self, file: str) -> _ObjectRecordWriter:
    return _ObjectRecordWriter(file)

  def directory_check(self, _: str) -> None:
    pass  # object stores have no directories to make


def summary_writer(logdir: PathLike) -> tensorboardX.SummaryWriter:
  """A TensorBoard writer for a local or `gs://` log dir."""
  if is_remote(logdir):
    record_writer.register_writer_factory(os.fspath(logdir).split("://")[0],
                                          _ObjectRecordWriterFactory())
  return tensorboardX.SummaryWriter(os.fspath(path(logdir)))
