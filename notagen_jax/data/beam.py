"""The data path on Apache Beam, for a corpus that outgrows one machine (NotaGen's 1.6M pieces).

Preparation on Beam (`PrepareOptions(beam_options=...)`) runs the very function that the local
worker processes run on each piece, `preparation._run_one`, and writes the same files; the driver
lists what is left to do and writes the report, as it does locally. The shards are the same TFDS
builder run with Beam (`shards.build_shards(..., beam_options=...)`). `prepare --beam_options`
does both; docs/data_at_scale.md has the Dataflow, Flink and Spark commands.

Beam's workers import this package too: they get it from `--setup_file=./pyproject.toml` (Beam
builds an sdist and installs it on each worker) or from a container image (`--sdk_container_image`).
"""

from __future__ import annotations

import base64
import os
import pickle
import shlex
from typing import Any, Callable, Sequence

import apache_beam as beam
from apache_beam.options import pipeline_options
from etils import epath

from notagen_jax import storage


def options(command_line: str) -> pipeline_options.PipelineOptions:
  """Beam's pipeline options from their command-line form, e.g. '--runner=DataflowRunner
  --project=P --region=R --temp_location=gs://B/tmp --setup_file=./pyproject.toml'."""
  return pipeline_options.PipelineOptions(shlex.split(command_line))


def check_reachable(beam_options: pipeline_options.PipelineOptions, *paths: str) -> None:
  """Raises ValueError when Dataflow is the runner and a path is on this machine's disk, which
  its workers cannot see."""
  if beam_options.view_as(pipeline_options.StandardOptions).runner != "DataflowRunner":
    return
  local = [os.fspath(path) for path in paths if not storage.is_remote(path)]
  if local:
    raise ValueError(f"Dataflow's workers cannot reach {', '.join(local)}: use gs:// paths")


def _load(line: str) -> Any:
  return pickle.loads(base64.b64decode(line))


def run_each(fn: Callable[[Any], Any], items: Sequence[Any], work_dir: epath.Path,
             beam_options: pipeline_options.PipelineOptions) -> None:
  """Calls `fn` (a module-level function) on every item on Beam's workers.

  The items travel in a file under work_dir rather than in the job: Dataflow refuses job requests
  over 20 MB, and the sources of a million pieces take hundreds of MB.
  """
  if not items:
    return
  work_list = work_dir / "beam_work_list.txt"
  with work_list.open("w") as f:
    for item in items:
      f.write(base64.b64encode(pickle.dumps(item)).decode() + "\n")
  with beam.Pipeline(options=beam_options) as pipeline:
    _ = (pipeline
         | "Read" >> beam.io.ReadFromText(os.fspath(work_list))
         # Reshuffled so that single items, not runs of lines, are what workers share out.
         | "Spread" >> beam.Reshuffle()
         | "Load" >> beam.Map(_load)
         | "Run" >> beam.Map(fn))
  work_list.unlink()
