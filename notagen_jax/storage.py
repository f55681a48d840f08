"""Paths a run reads and writes, local or in an object store (`gs://...`), as etils epath.

Object stores have neither directories nor appends: logs that grow are rewritten whole there, and
nothing is ever created locally for a remote URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

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


def append_text(file: PathLike, text: str) -> None:
  """Adds `text` at the end of `file` (made if missing): appended locally, rewritten remotely."""
  file = path(file)
  if is_remote(file):
    file.write_text((file.read_text() if file.exists() else "") + text)
  else:
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("a") as f:
      f.write(text)


def save_figure(figure: Any, file: PathLike, **kwargs: Any) -> None:
  """A Matplotlib figure as a PNG at `file`, drawn in memory (savefig knows only local files)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", **kwargs)
  path(file).write_bytes(buffer.getvalue())


@contextlib.contextmanager
def local_copy(file: PathLike) -> Iterator[pathlib.Path]:
  """`file` as a local path for tools that open files themselves (music21): the file itself, or
  a temporary copy of a remote one (same name, removed on exit)."""
  if not is_remote(file):
    yield pathlib.Path(file)
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = pathlib.Path(tmp) / path(file).name
    copy_file(file, local)
    yield local


@contextlib.contextmanager
def local_output(file: PathLike) -> Iterator[pathlib.Path]:
  """A local path for a tool to write `file` to: `file` itself, or a temporary file (same name)
  uploaded to the remote `file` when the block ends without error."""
  if not is_remote(file):
    yield pathlib.Path(file)
    return
  target = path(file)
  with tempfile.TemporaryDirectory() as tmp:
    local = pathlib.Path(tmp) / target.name
    yield local
    copy_file(local, target)


def copy_file(source: PathLike, target: PathLike) -> None:
  """Streams one file between any two places (local or remote)."""
  with path(source).open("rb") as src, path(target).open("wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 24)


def files_under(folder: PathLike) -> list[epath.Path]:
  """Every file under `folder` at any depth, sorted.

  A walk, as epath refuses recursive globs (many RPCs on GCS); its walk gives remote folders
  without their `gs://`, so each file is named from `folder` instead.
  """
  folder = path(folder)
  bare = os.fspath(folder).split("://", 1)[-1]
  files = []
  for directory, _, names in folder.walk():
    relative = os.path.relpath(os.fspath(directory), bare)
    base = folder if relative == "." else folder / relative
    files += [base / name for name in names]
  return sorted(files, key=os.fspath)


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
