import json
import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

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


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  result = subprocess.run(["shellcheck", "--external-sources", str(LAUNCH / script)], cwd=REPO,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_tpu_vm_two_host_v5p_pod():
  lines = _lines("tpu_vm.sh", "--name=ng-v5p", "--project=my-proj", "--zone=us-east5-a",
                 "--accelerator_type=v5p-16", "--runtime_version=v2-alpha-tpuv5",
                 "--bucket=gs://my-bucket", "--shards_dir=gs://my-bucket/shards/1.0.0", "all",
                 "--", "--config.train.num_steps=100")
  where = ["--project=my-proj", "--zone=us-east5-a"]
  describe, create = lines[0].split(" || ")
  assert shlex.split(describe) == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "ng-v5p",
                                   *where, "--format=value(state)"]
  assert shlex.split(create) == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ng-v5p", *where,
                                 "--accelerator-type=v5p-16", "--version=v2-alpha-tpuv5"]
  assert "git -C" in lines[1] and "ls-files" in lines[1] and "tar" in lines[1]
  assert shlex.split(lines[2]) == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                                   "/tmp/notagen-jax-ng-v5p.tar.gz", "ng-v5p:notagen-jax.tar.gz",
                                   *where, "--worker=all"]
  ssh = [shlex.split(line) for line in lines if " ssh " in line]
  assert len(ssh) == 2  # install, then run
  for argv in ssh:
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ng-v5p"]
    assert "--worker=all" in argv and argv[-1].startswith("--command=")
  assert "pip install -r requirements.txt 'jax[tpu]'" in ssh[0][-1]
  run = ssh[1][-1]
  assert ("python3 -m notagen_jax.train --config=configs/pretrain.py:small "
          "--workdir=gs://my-bucket/runs/ng-v5p --config.data.shards_dir=gs://my-bucket/shards/1.0.0 "
          "--config.distributed.num_processes=2 --config.train.num_steps=100 2>&1 | tee -a "
          "logs/ng-v5p/$(hostname).log") in run
  assert shlex.split(lines[-1]) == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                                    "ng-v5p:notagen-jax/logs/ng-v5p/*", "logs/ng-v5p/", *where,
                                    "--worker=all"]
  down = _lines("tpu_vm.sh", "down", env=_env(TPU_NAME="ng-v5p", PROJECT="my-proj",
                                               ZONE="us-east5-a"))
  assert [shlex.split(line) for line in down] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ng-v5p", *where, "--quiet"]]
  missing = _run("tpu_vm.sh", "--dry-run", "--name=x", "run", check=False)
  assert missing.returncode == 2 and "--project" in missing.stderr


def test_tpu_vm_single_host_and_git_code():
  lines = _lines("tpu_vm.sh", "--name=ng", "--project=p", "--zone=z", "--accelerator_type=v5e-8",
                 "--runtime_version=v2-alpha-tpuv5-lite", "--code=git",
                 "--git_repo=https://example.com/notagen-jax.git", "--git_ref=v1",
                 "--workdir=/mnt/shared/run", "all")
  assert "git clone https://example.com/notagen-jax.git notagen-jax" in lines[1]
  assert "num_processes" not in lines[2]  # one host: a plain run


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
  assert sbatch[script + 1:] == ["--mode=per-gpu", "--config=configs/pretrain.py:small",
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


# About 50 s of CPU time over the two processes (compile, 2 steps, eval, checkpoint, export);
# 68-74 s of wall time on the busy 2-core test machine, hence slow.
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
