"""Generation over processes and devices: pieces/s of `generation.generate` as CLaMP-DPO runs it.

  python benchmarks/generate_scaling.py [--size=tiny] [--pieces=32] [--batch=8]
      [--max_patches=32] [--layouts=1x1,1x8,2x1,2x4]

A layout PxD is P processes (jax.distributed on localhost, as launch/local.sh starts them) of D
simulated CPU devices each (XLA's host platform device count; on a GPU or TPU host the real local
devices). Each process draws its share of the pieces (`distributed.share`), its sampler spreading
its rows over its D devices (`batch` rows per process, batch/D per device); pieces/s is the whole
run's, from the first process entering `generate` to the last finishing (a barrier on each side),
after a warm-up run that compiles. The model is randomly initialized (`model.create`), sampling
unconstrained as the original's, every piece stopped after `max_patches` patches, so every layout
draws the same characters (the pieces are the same whatever the layout; the printed digest of
their texts shows it).

What limits the scaling on a CPU: every simulated device of a process and every process share the
machine's cores (`os.cpu_count()`, printed), and XLA already spreads one device's matmuls over
its thread pool; so more devices or processes than cores add no compute, only more, smaller
calls per character (each row's decode is memory-bound at these batch sizes). Scaling shows
where the devices are real: one process per GPU / TPU host, D accelerators each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "%Baroque\n%Bach, Johann Sebastian\n%Choral\n"


def worker(args) -> None:
  """One process of a layout: warm up, then the timed run; process 0 prints a JSON line."""
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from notagen_jax import distributed  # pylint: disable=import-outside-toplevel
  from notagen_jax import generation  # pylint: disable=import-outside-toplevel
  from notagen_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from notagen_jax import sampling  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict({"distributed": {
      "coordinator_address": args.coordinator, "num_processes": args.processes,
      "process_id": args.process_id}})
  if args.processes > 1:
    distributed.initialize(c)
  model = model_lib.create(model_lib.config_for(args.size))
  settings = sampling.Settings(max_patches=args.max_patches)
  out = pathlib.Path(args.out)

  def run(name, n):
    distributed.barrier(f"bench:{name}:start")
    start = time.perf_counter()
    written = generation.generate(model, [PROMPT] * n, out / name, settings=settings,
                                  batch=args.batch, formats=(), progress=False)
    return time.perf_counter() - start, written

  run("warmup", args.batch * jax.process_count())
  seconds, written = run("timed", args.pieces)
  if distributed.is_lead():
    texts = "".join(pathlib.Path(w.files["abc"]).read_text() for w in written)
    print(json.dumps({"seconds": seconds, "pieces_per_s": len(written) / seconds,
                      "chars": sum(w.chars for w in written),
                      "digest": hashlib.sha256(texts.encode()).hexdigest()[:12],
                      "devices": jax.local_device_count()}), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def layout(args, processes: int, devices: int) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  port = _free_port()
  with tempfile.TemporaryDirectory() as out:
    cmds = [[sys.executable, __file__, "--worker", f"--processes={processes}",
             f"--process_id={i}", f"--coordinator=127.0.0.1:{port}", f"--out={out}",
             f"--size={args.size}", f"--pieces={args.pieces}", f"--batch={args.batch}",
             f"--max_patches={args.max_patches}"] for i in range(processes)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for cmd in cmds]
    outputs = [p.communicate()[0] for p in procs]
  if any(p.returncode for p in procs):
    raise SystemExit(f"layout {processes}x{devices} failed (exit codes "
                     f"{[p.returncode for p in procs]})")
  return json.loads(outputs[0].strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--pieces", type=int, default=32)
  parser.add_argument("--batch", type=int, default=8, help="rows per process")
  parser.add_argument("--max_patches", type=int, default=32)
  parser.add_argument("--layouts", default="1x1,1x8,2x1,2x4",
                      help="PxD: P processes of D local devices each")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", default="", help=argparse.SUPPRESS)
  parser.add_argument("--out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  try:
    layouts = [tuple(int(n) for n in item.split("x")) for item in args.layouts.split(",")]
  except ValueError:
    raise SystemExit(f"--layouts: PxD items such as 2x4, got {args.layouts!r}") from None
  print(f"# {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {args.size} model, "
        f"{args.pieces} pieces of {args.max_patches} patches, {args.batch} rows per process")
  print(f"{'processes':>9} {'devices':>7} {'pieces/s':>9} {'seconds':>8} {'chars':>7}  digest")
  for processes, devices in layouts:
    r = layout(args, processes, devices)
    print(f"{processes:>9} {devices:>7} {r['pieces_per_s']:>9.2f} {r['seconds']:>8.1f} "
          f"{r['chars']:>7}  {r['digest']}", flush=True)


if __name__ == "__main__":
  main()
