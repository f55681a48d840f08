import math
import os
import pathlib
import subprocess
import sys

import pytest

from notagen_jax import config as config_lib
from notagen_jax import planning
from notagen_jax import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
# The paper's sizes, and how far an XLA-measured peak may be from the estimate (observed on this
# CPU: 0.90 to 1.09 over patch lengths 128-512, dropout on and off, remat on and off).
PAPER_PARAMS = {"small": 110e6, "medium": 244e6, "large": 516e6}
MEMORY_MARGIN = 0.2


def _config(size, batch_size=64, mesh=None, **model):
  c = config_lib.base_config("pretrain", size)
  c.data.batch_size = batch_size
  if mesh is not None:
    c.mesh.shape = mesh
  for key, value in model.items():
    c.model[key] = value
  return c


def _gpt2_params(hidden, n_layers):
  """Per layer: two LayerNorms (2 x 2H), c_attn (H x 3H + 3H), c_proj (H x H + H), c_fc
  (H x 4H + 4H), mlp c_proj (4H x H + H): 12 H^2 + 13 H; then ln_f (2H)."""
  return n_layers * (12 * hidden**2 + 13 * hidden) + 2 * hidden


@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_parameter_counts_match_the_paper(size):
  p = planning.plan(_config(size), devices="v5p-64")
  print(f"{size}: {p.n_params:,} parameters")
  cfg = trainer.model_config(p.config)
  h = cfg.hidden
  # The original's state dict (spec section 4), the tied head once and the patch level's unused
  # [1, H] wte not at all: the patch embedding (16 x 128 -> H, with bias) and positions, the
  # char embedding (128 x H) and positions (17 x H), and the two stacks.
  expected = (2048 * h + h + cfg.patch_length * h + _gpt2_params(h, cfg.patch_layers)
              + 128 * h + 17 * h + _gpt2_params(h, cfg.char_layers))
  assert p.n_params == expected
  assert round(p.n_params / 1e6) == PAPER_PARAMS[size] / 1e6  # the paper's figure, in millions
  # Params and AdamW state are sharded by the rules: 32 devices hold 1/32 each, except the
  # q/k/v and fc biases (logical axes 'heads' / 'mlp' map to 'tensor' only, of size 1 here),
  # which every device holds whole.
  cfg = trainer.model_config(p.config)
  whole = (cfg.patch_layers + cfg.char_layers) * (3 * cfg.hidden + 4 * cfg.hidden)
  assert p.param_bytes == 4 * ((p.n_params - whole) // 32 + whole)
  assert p.opt_bytes == pytest.approx(2 * p.param_bytes, rel=1e-4)


def test_topologies():
  v5p = planning.topology("v5p-64")
  assert (v5p.n_devices, v5p.n_hosts, v5p.device_kind) == (32, 8, "TPU v5p")
  assert planning.topology("v5p-16").n_hosts == 2  # 8 chips, 4 per host
  assert (planning.topology("v4-32").n_devices, planning.topology("v4-32").n_hosts) == (16, 4)
  assert (planning.topology("v5e-16").n_devices, planning.topology("v5e-16").n_hosts) == (16, 4)
  assert planning.topology("v5e-8").n_hosts == 1
  h100 = planning.topology("h100x8")
  assert (h100.n_devices, h100.n_hosts, h100.peak_flops) == (8, 1, 989e12)
  assert planning.topology("h100x16").n_hosts == 2
  with pytest.raises(ValueError, match="expected v4-N"):
    planning.topology("tpu-64")


def test_a_gpu_run_may_use_jax_s_share_of_its_memory(monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert planning.topology("h100x8").usable_bytes == 0.75 * 81559 * 2**20  # JAX's default share
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert planning.topology("h200x16").usable_bytes == 0.9 * 143771 * 2**20
  assert planning.topology("v5p-8").usable_bytes == 95 * 2**30  # a TPU's whole HBM
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "most")
  with pytest.raises(ValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION='most': not a number"):
    planning.topology("a100x8")


def test_mesh_resolution():
  assert planning.plan(_config("small"), devices="v5p-64").mesh_shape == (1, 32, 1)
  assert planning.plan(_config("small"), devices="h100x8").mesh_shape == (1, 8, 1)
  assert planning.plan(_config("small"), devices="v5p-64", mesh=(2, -1, 2)).mesh_shape == (2, 8, 2)
  assert planning.plan(_config("small"), mesh=(2, 4, 1)).mesh_shape == (2, 4, 1)
  with pytest.raises(ValueError, match="does not divide"):
    planning.plan(_config("small"), devices="h100x8", mesh=(3, -1, 1))
  with pytest.raises(ValueError, match="config.data.batch_size 8 does not split over the 32"):
    planning.plan(_config("small", batch_size=8), devices="v5p-64")


def test_dpo_config_splits_over_any_slice():
  from configs import dpo  # pylint: disable=import-outside-toplevel
  for devices, pairs in (("v5p-64", 32), ("v5e-256", 256), ("h100x8", 8)):
    p = planning.plan(dpo.get_config("large"), devices=devices)
    assert (p.config.data.batch_size, p.rows_per_device) == (pairs, 1)


def test_flops_and_step_time():
  c = _config("small")
  p = planning.plan(c, devices="v5p-64", mfu=0.5)
  forward = trainer.forward_flops(trainer.model_config(c), 2048)
  assert p.flops_per_step == 3 * forward * 64
  assert p.step_seconds == pytest.approx(p.flops_per_step / (32 * 459e12 * 0.5))
  # Remat keeps one activation per token and block instead of ~16: far less memory.
  assert p.activations_remat["total"] < p.activations["total"] / 3


@pytest.mark.parametrize("remat", [False, True])
def test_tiny_memory_estimate_matches_xla_on_cpu(remat):
  # One row per device over 8 data-parallel CPU devices; XLA compiles the real train step.
  c = _config("tiny", batch_size=8, mesh=(-1, 1, 1), remat=remat)
  p = planning.plan(c, devices="cpu")
  assert p.mesh_shape == (8, 1, 1) and p.rows_per_device == 1
  assert p.compiled.target == "cpu"
  estimate, measured = p.total_bytes(remat), p.compiled.memory["peak"]
  print(f"tiny remat={remat}: estimate {estimate / 2**20:.1f} MiB, XLA {measured / 2**20:.1f} MiB")
  assert abs(estimate / measured - 1) <= MEMORY_MARGIN


@pytest.mark.parametrize("name,chips,grid", [
    ("v5p-8", 4, (2, 2, 1)), ("v5p-64", 32, (2, 4, 4)), ("v5p-1024", 512, (8, 8, 8)),
    ("v4-32", 16, (2, 2, 4)), ("v5e-16", 16, (4, 4, 1)), ("v5e-256", 256, (16, 16, 1)),
    ("v6e-8", 8, (2, 4, 1))])
def test_tpu_slices_as_libtpu_describes_them(name, chips, grid):
  devices = planning.tpu_devices(planning.topology(name))
  assert len(devices) == chips
  assert all(d.platform == "tpu" for d in devices)
  extent = tuple(max(d.coords[i] for d in devices) + 1 for i in range(3))
  assert extent == grid


def _plan_cli(*args):
  return subprocess.run([sys.executable, "-m", "notagen_jax.plan", *args], cwd=REPO,
                        capture_output=True, text=True)


def _figure(out, key):
  return float(out.split(key)[1].split()[0])


@pytest.mark.parametrize("config", ["pretrain.py:tiny", "dpo.py:tiny"])
def test_plan_compiles_the_train_step_for_a_tpu_slice(config):
  # Patches of 64 (not 256): the same program at a quarter of the length compiles in half the time.
  run = _plan_cli(f"--config=configs/{config}", "--devices=v5p-8", "--compile",
                  "--config.data.per_device_batch_size=2", "--config.data.batch_size=0",
                  "--config.model.patch_length=64")
  print(run.stdout, run.stderr[-2000:])
  assert run.returncode == 0, run.stderr[-2000:]
  assert "compiled    for v5p-8 (no remat, layers unrolled)" in run.stdout
  assert "8 rows global, 2 per device" in run.stdout
  # XLA's own count of one step's FLOPs on one chip against the planner's 3 x forward estimate.
  xla = _figure(run.stdout, "xla flops")
  estimate = _figure(run.stdout, "per device per step; estimate")
  assert 0.8 < estimate / xla < 1.25


def _peak_mib(out):
  return _figure(out, "peak ") * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[
      out.split("peak ")[1].split()[1]]


@pytest.mark.slow  # three compiles, two of them for 32 devices: runs in CI's second pass
def test_plan_says_when_xla_counts_collective_matmul_loops_once():
  # fsdp=32: XLA:TPU turns the sharded matmuls and their all-gathers / reduce-scatters into
  # windowed-einsum loops, whose bodies its cost analysis counts once and whose float32 outputs
  # stay unfused; the libtpu flags plan names compile the same step without them.
  args = ("--config=configs/pretrain.py:tiny", "--devices=v5p-64", "--compile",
          "--config.data.per_device_batch_size=1", "--config.data.batch_size=0",
          "--config.model.remat=True")
  run = _plan_cli(*args)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "xla flops   >= " in run.stdout
  loops = int(run.stdout.split("XLA counts each of its ")[1].split()[0])
  assert loops >= 1
  flags = run.stdout.split("LIBTPU_INIT_ARGS='")[1].split("'")[0]
  assert flags == planning.NO_WINDOWED_EINSUM
  without = subprocess.run([sys.executable, "-m", "notagen_jax.plan", *args], cwd=REPO,
                           capture_output=True, text=True,
                           env={**os.environ, "LIBTPU_INIT_ARGS": flags,
                                # a cached program compiled with the loops must not stand in
                                "JAX_ENABLE_COMPILATION_CACHE": "false"})
  assert without.returncode == 0, without.stderr[-2000:]
  assert "collective-matmul" not in without.stdout and "xla flops   >= " not in without.stdout
  # Counted whole, the step's FLOPs are v5p-8's at the same rows per device.
  v5p_8 = _plan_cli(*(a.replace("v5p-64", "v5p-8") for a in args))
  assert v5p_8.returncode == 0, v5p_8.stderr[-2000:]
  assert _figure(without.stdout, "xla flops   ") == pytest.approx(
      _figure(v5p_8.stdout, "xla flops   "), rel=0.01)
  # The loops' unfused outputs: 67 MiB with them, 28 MiB without (v5p-8: 32 MiB).
  assert _peak_mib(without.stdout) < 0.6 * _peak_mib(run.stdout)


def test_plan_refuses_a_step_that_does_not_fit():
  # 16 GiB per v5e chip cannot hold the activations of 4,096 rows per chip.
  run = _plan_cli("--config=configs/pretrain.py:tiny", "--devices=v5e-4", "--compile",
                  "--config.data.batch_size=16384")
  assert run.returncode != 0
  error = run.stderr.strip().splitlines()[-1]
  assert error.startswith("plan: does not fit on v5e-4: RESOURCE_EXHAUSTED"), error
  assert "remat" in error


def _gpu_plan_cli(cuda_plugin, *args, fraction=None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cuda_plugin), env.get("PYTHONPATH")]))
  if fraction is not None:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(fraction)
  return subprocess.run([sys.executable, "-m", "notagen_jax.plan", *args], cwd=REPO, env=env,
                        capture_output=True, text=True)


def _mib(out, key):
  amount, unit = out.split(key)[1].split()[:2]
  return float(amount) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[unit.rstrip(",);")]


@pytest.mark.parametrize("config", ["pretrain.py:tiny", "dpo.py:tiny"])
def test_plan_compiles_the_train_step_for_gpu_nodes(cuda_plugin, config):
  # Two nodes of 8 H100s, FSDP over all 16: the compiled step's arguments are each GPU's 1/16 of
  # the params and AdamW state (and its row), as the planner shards them.
  run = _gpu_plan_cli(cuda_plugin, f"--config=configs/{config}", "--devices=h100x16", "--compile",
                      "--config.data.per_device_batch_size=1", "--config.data.batch_size=0",
                      "--config.model.patch_length=64")
  print(run.stdout, run.stderr[-2000:])
  assert run.returncode == 0, run.stderr[-2000:]
  assert ("h100x16: 16 x NVIDIA H100 on 2 host(s), 79.65 GiB each, 59.74 GiB for JAX "
          "(XLA_PYTHON_CLIENT_MEM_FRACTION 0.75)") in run.stdout
  assert "mesh        data=1 fsdp=16 tensor=1" in run.stdout
  assert "compiled    for h100x16 (no remat, layers unrolled)" in run.stdout
  state = _mib(run.stdout, "params ") + _mib(run.stdout, "optimizer state ")
  rows = 2 if config.startswith("dpo") else 1
  batch = rows * 64 * (16 + 1) * 4 / 2**20  # int32 patches and masks
  assert _mib(run.stdout, "arguments ") == pytest.approx(state + batch, rel=0.02)


def test_plan_refuses_a_gpu_step_beyond_jax_s_share_of_memory(cuda_plugin):
  # 24 GiB of an 80 GiB A100 is JAX's at a fraction of 0.3: not enough for 512 tiny rows per GPU.
  run = _gpu_plan_cli(cuda_plugin, "--config=configs/pretrain.py:tiny", "--devices=a100x8",
                      "--compile", "--config.data.batch_size=4096", fraction=0.3)
  assert run.returncode != 0
  error = run.stderr.strip().splitlines()[-1]
  assert error.startswith("plan: does not fit: the compiled step needs "), error
  assert error.split(" per device, ")[1].startswith(
      "a100x8 has 24.00 GiB for JAX (XLA_PYTHON_CLIENT_MEM_FRACTION 0.3); try "), error


def test_plan_cli_prints_the_plan():
  out = subprocess.run(
      [sys.executable, "-m", "notagen_jax.plan", "--config=configs/pretrain.py:small",
       "--devices=v5p-64", "--config.data.batch_size=64", "--mfu=0.4"],
      cwd=REPO, capture_output=True, text=True, check=True).stdout
  print(out)
  assert "fsdp=32" in out and "109,579,008" in out and "MFU 0.4" in out
  assert math.isclose(float(out.split("flops/step")[1].split()[0]),
                      3 * trainer.forward_flops(trainer.model_config(_config("small")), 2048) * 64,
                      rel_tol=1e-3)
  bad = subprocess.run([sys.executable, "-m", "notagen_jax.plan",
                        "--config=configs/pretrain.py:small", "--devices=v5p-64"],
                       cwd=REPO, capture_output=True, text=True)
  assert bad.returncode != 0 and "config.data.batch_size" in bad.stderr
