"""The Beam route writes what the local route writes: prepared pieces, report and shards."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from array_record.python import array_record_module
from etils import epath
from tensorflow_datasets.proto import tf_example_pb2

import gcs_emulator
from notagen_jax import storage
from notagen_jax.data import corpus
from notagen_jax.data import preparation
from notagen_jax.data import shards

REPO = pathlib.Path(__file__).resolve().parents[1]
DIRECT = "--runner=DirectRunner"


def tree(root: epath.PathLike) -> dict[str, bytes]:
  """Every file under root by its relative path, the shards and the report left out."""
  root = storage.path(root)
  return {path.relative_to(root).as_posix(): path.read_bytes()
          for path in storage.files_under(root)
          if path.relative_to(root).parts[0] != "shards" and path.name != "report.json"}


def report(prepared: epath.PathLike) -> dict:
  saved = json.loads((storage.path(prepared) / "report.json").read_text())
  del saved["seconds_this_run"]
  return saved


def records(shards_dir: epath.PathLike, split: str) -> list[bytes]:
  """A split's records in file order, each re-serialized with its feature map sorted: protobuf
  writes map entries in an order that differs from process to process."""
  files = sorted(p for p in storage.files_under(shards_dir) if f"-{split}.array_record-" in p.name)
  out = []
  for file in files:
    with storage.local_copy(file) as local:
      reader = array_record_module.ArrayRecordReader(os.fspath(local))
      out += [tf_example_pb2.Example.FromString(r).SerializeToString(deterministic=True)
              for r in reader.read_all()]
      reader.close()
  return out


def assert_same_shards(local: epath.PathLike, beam_built: epath.PathLike) -> None:
  local, beam_built = storage.path(local), storage.path(beam_built)
  names = sorted(p.name for p in storage.files_under(local))
  assert sorted(p.name for p in storage.files_under(beam_built)) == names
  for name in ("dataset_info.json", "features.json"):
    assert json.loads((beam_built / name).read_text()) == json.loads((local / name).read_text())
  splits = json.loads((local / "dataset_info.json").read_text())["splits"]
  assert {split["name"] for split in splits} == {"train", "eval"}
  for split in splits:
    expected = records(local, split["name"])
    assert len(expected) == sum(map(int, split["shardLengths"]))
    assert records(beam_built, split["name"]) == expected


def prepare(env: dict[str, str], cwd: pathlib.Path, *flags: str) -> str:
  """Runs `prepare` (in its own process: this one must not import Beam, see test_shards)."""
  done = subprocess.run([sys.executable, "-m", "notagen_jax.prepare", *flags], cwd=cwd, env=env,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout.split("shards: ")[1].strip()


def local_env() -> dict[str, str]:
  return {**os.environ, "PYTHONPATH": str(REPO)}


def test_beam_route_writes_what_the_local_route_writes(tmp_path):
  """A slice of music21's corpus prepared and sharded on Beam's DirectRunner and by local
  processes."""
  sources = [s for s in corpus.music21_sources() if "bach/bwv" in s.path]
  preparation.prepare_corpus(sources, tmp_path / "local",
                             preparation.PrepareOptions(eval_fraction=0.3, workers=1, limit=6))
  local = shards.build_shards(tmp_path / "local", tmp_path / "local" / "shards")
  built = prepare(local_env(), tmp_path, "--input=music21", "--match=bach/bwv", "--limit=6",
                  "--eval_fraction=0.3", f"--output={tmp_path / 'beam'}",
                  f"--beam_options={DIRECT}")
  assert "apache_beam" not in sys.modules
  assert len(list((tmp_path / "local" / "pieces").rglob("*.json"))) == 6
  assert tree(tmp_path / "beam") == tree(tmp_path / "local")
  assert report(tmp_path / "beam") == report(tmp_path / "local")
  assert_same_shards(local, built)


def test_dataflow_needs_remote_paths(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "notagen_jax.prepare", "--input=music21", f"--output={tmp_path}",
       "--beam_options=--runner=DataflowRunner --project=p --region=r "
       "--temp_location=gs://b/tmp"],
      cwd=tmp_path, env=local_env(), capture_output=True, text=True)
  assert done.returncode != 0
  assert f"Dataflow's workers cannot reach music21, {tmp_path}: use gs:// paths" in done.stderr
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_beam_route_on_gcs(tmp_path):
  """`prepare --beam_options`, every path gs:// as on Dataflow (the work list and the index read
  by Beam's own IO, the shards written by workers and uploaded), against `prepare` on gs://."""
  bucket = "gs://notagen-beam"
  with gcs_emulator.running(bucket.removeprefix("gs://")) as gcs:
    for score in sorted((corpus.music21_corpus_root() / "bach").glob("bwv1*.mxl"))[:4]:
      epath.Path(f"{bucket}/scores/{score.name}").write_bytes(score.read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(gcs, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    built = {route: prepare(env, tmp_path, f"--input={bucket}/scores", f"--output={bucket}/{route}",
                            "--eval_fraction=0.3", flag)
             for route, flag in (("local", "--workers=1"), ("beam", f"--beam_options={DIRECT}"))}
    assert built["beam"] == f"{bucket}/beam/shards/notagen_shards/p16_prompt/1.0.0"
    assert len(tree(f"{bucket}/local")) == 4 * 2 + 1  # piece and interleaved ABC, index
    assert tree(f"{bucket}/beam") == tree(f"{bucket}/local")
    assert report(f"{bucket}/beam") == report(f"{bucket}/local")
    assert_same_shards(built["local"], built["beam"])
