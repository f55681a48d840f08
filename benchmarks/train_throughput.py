"""Training-step throughput of the trainer's jitted step, and the DPO step against the original's.

  python benchmarks/train_throughput.py [--steps=3] [--small-steps=1] [--dpo-steps=2]
      [--tiny-batch=8] [--small-patches=1024] [--dpo-chosen=253] [--dpo-rejected=256]
      [--torch-attn=eager,sdpa] [--skip=tiny,small,dpo,dpo-reference,torch]

The default run takes several minutes on a 2-core CPU (the DPO part alone about five); e.g.
`--skip=tiny,small --dpo-steps=1` only times the DPO steps, `--skip=tiny,dpo --small-patches=2048`
the small model at its full length.

Rows:
- tiny / small pre-training steps of `trainer.make_train_step` (AdamW, dropout on) on real pieces
  (tiny: 8 golden pieces, each cut to 256 patches and padded; small: one row of the golden texts'
  whole encodings laid end to end, cut to --small-patches): target chars per second, useful
  TFLOP/s (3x the forward matmul FLOPs of the real patches and real target chars, padding
  excluded) and MFU against the peak matmul rate measured in the same run (the best jnp float32
  matmul rate of the model's shapes, measured before and after each part);
  `trainer MFU` is what `train_and_evaluate` logs (3x `trainer.forward_flops` over the full padded
  patch_length, every char position).
- the DPO step on the small model (12/3/768) for one pair of real pieces (chosen: the first 253
  patches of Mozart K.80/ii in C, rejected: the first 256 of the Maple Leaf Rag in C, from
  prepare_cases.json): the trainer's step with precomputed reference log-probs and char packing
  (no dropout, the trainer's DPO default), the trainer's step with a reference forward every step
  (dropout on in policy and reference, as the original), and the original's step in PyTorch
  (transformers GPT-2: policy forward on chosen, then rejected, batch 1, dropout on; reference
  forward on both under no_grad, dropout on; DPO-Positive beta 0.1 lambda 10; backward;
  clip_grad_norm 1.0; AdamW lr 1e-6), same weights, the same thread count. The steps of
  all variants are interleaved round by round so that other load on the machine hits them alike;
  every ratio is from this run. Besides the wall time, each step's CPU time of the process (all
  threads) is recorded: on a shared machine it moves much less with other load.

The trainer's step does not pass `packed_len` to `model.forward`, so with `char_packing` alone it
packs into the full length and skips nothing; this script supplies the packed length (computed
from the batch with `model.packed_length`, as `model_throughput.py` does) while tracing the
trainer's step. DPO rows are padded to the smallest multiple of 64 patches that holds both pieces
(`--dpo-pad`), not to the small model's 2048 (`preference_dataset` pads to `patch_length`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

import machine  # benchmarks/machine.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES_ORDER = ("tiny", "small")


def _setup_threads(threads: int) -> None:
  # Before jax / torch start their thread pools. XLA's CPU client uses every core; torch gets the
  # same number.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["OMP_NUM_THREADS"] = str(threads)


# ------------------------------------------------------------------------------------------------
# Real rows.


def _texts(golden: pathlib.Path) -> dict[str, str]:
  """Named real ABC texts: three chorales, and Bach / Mozart / Joplin in a few keys."""
  texts = {}
  for case in json.loads((golden / "cases.json").read_text())["cases"]:
    texts[case["name"]] = case["input_text"]
  for case in json.loads((golden / "prepare_cases.json").read_text())["cases"]:
    name = case["source"].split()[-1].split("/")[0]  # bach / mozart / joplin
    for key in ("C", "D", "F", "A"):
      texts[f"{name}-{key}"] = case["augmented_rest_reduced"][key]
  return texts


def encode(text: str, n_patches: int | None = None):
  """A text's training encoding (bos, metadata, body, eos), cut at the head to n_patches."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from notagen_jax.data.tokenizer import Patchilizer  # pylint: disable=import-outside-toplevel
  ids = np.asarray(Patchilizer(patch_length=n_patches or 10**6).encode_train(text), np.int32)
  if n_patches and len(ids) < n_patches:
    raise ValueError(f"the text has {len(ids)} patches, {n_patches} wanted")
  return ids


def pretrain_batch(texts: dict[str, str], batch: int, patch_length: int):
  """`batch` pieces (cycling through the texts), each cut to patch_length and padded."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from notagen_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  names = list(texts)
  rows = [pipeline.pad_rows(encode(texts[names[i % len(names)]])[:patch_length], patch_length)
          for i in range(batch)]
  return {k: np.stack([r[k] for r in rows]) for k in ("patches", "masks")}


def long_row(texts: dict[str, str], n_patches: int):
  """One row of n_patches: whole encodings of the texts laid end to end, cut to n_patches."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from notagen_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  ids = np.concatenate([encode(t) for t in texts.values()])
  if len(ids) < n_patches:
    raise ValueError(f"only {len(ids)} real patches, {n_patches} wanted")
  rows = pipeline.pad_rows(ids[:n_patches], n_patches)
  return {k: v[None] for k, v in rows.items()}


# ------------------------------------------------------------------------------------------------
# FLOPs.


def useful_forward_flops(cfg, patches, masks) -> float:
  """Forward matmul FLOPs of a batch's real work: real patches, and one char position per real
  target char (patch i's output predicts patch i+1's chars); causal attention counted once."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  h, v, p = cfg.hidden, cfg.vocab, cfg.patch_size
  total = 0.0
  for row, mask in zip(np.asarray(patches), np.asarray(masks)):
    n = int(mask.sum())
    n_chars = int((row[1:n] != 0).sum())
    patch = 2 * n * p * v * h + cfg.patch_layers * (24 * h * h * n + 2 * n * n * h)
    char = n_chars * (cfg.char_layers * (24 * h * h + 2 * p * h) + 2 * h * v)
    total += patch + char
  return total


def peak_matmul_flops(shapes=((2048, 2048, 2048), (1024, 768, 3072), (1024, 3072, 768)),
                      repeats: int = 5) -> float:
  """The machine's matmul rate now: the best FLOP/s of jnp float32 matmuls of the model's shapes
  (M x K @ K x N), best of `repeats` each (the idea of `model_throughput.py`)."""
  import jax  # pylint: disable=import-outside-toplevel
  matmul = jax.jit(lambda a, b: a @ b)
  best = 0.0
  for m, k, n in shapes:
    a = jax.random.normal(jax.random.key(0), (m, k))
    b = jax.random.normal(jax.random.key(1), (k, n))
    matmul(a, b).block_until_ready()
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(a, b).block_until_ready()
      best = max(best, 2 * m * k * n / (time.perf_counter() - start))
  return best


# ------------------------------------------------------------------------------------------------
# JAX: the trainer's step.


@contextlib.contextmanager
def supplied_packed_len(lengths: dict[tuple[int, ...], int]):
  """While active, `model.forward` calls without `packed_len` get the one registered for their
  patches' shape (the trainer's losses call it without one)."""
  from notagen_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  original = model_lib.forward

  def forward(model, patches, mask, **kwargs):
    if model.cfg.char_packing and kwargs.get("packed_len") is None:
      kwargs["packed_len"] = lengths.get(tuple(patches.shape))
    return original(model, patches, mask, **kwargs)

  model_lib.forward = forward
  try:
    yield
  finally:
    model_lib.forward = original


class Timed:
  """A step to time: `run()` runs one and records its wall time and the CPU time of this process
  (all threads), which other load on the machine changes much less than the wall time."""
  times: list[float]
  cpu_times: list[float]

  def _step(self) -> None:
    raise NotImplementedError

  def run(self, record: bool = True) -> float:
    start, cpu_start = time.perf_counter(), time.process_time()
    self._step()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if record:
      self.times.append(seconds)
      self.cpu_times.append(cpu)
    return seconds


class JaxStep(Timed):
  """The trainer's jitted, donated train step on a fixed batch; `run()` times one step."""

  def __init__(self, config, batch: dict):
    import jax  # pylint: disable=import-outside-toplevel
    from notagen_jax import sharding  # pylint: disable=import-outside-toplevel
    from notagen_jax import trainer  # pylint: disable=import-outside-toplevel
    # A DPO config with precompute_reference off needs init_checkpoint: build_setup keeps the
    # reference params only when it loads one. One device, as the PyTorch step it is compared to,
    # whatever the host has (a host with several gets its first).
    self.setup = trainer.build_setup(config, devices=jax.devices()[:1])
    self.step = trainer.make_train_step(self.setup)
    self.state = self.setup.state
    self.batch = sharding.global_batch(batch, self.setup.mesh)
    self.times: list[float] = []
    self.cpu_times: list[float] = []
    self.metrics: dict = {}

  def _step(self) -> None:
    import jax  # pylint: disable=import-outside-toplevel
    self.state, metrics = self.step(self.state, self.setup.reference, self.batch)
    jax.block_until_ready((self.state, metrics))
    self.metrics = {k: float(v) for k, v in metrics.items()}
    if not self.metrics["finite"]:
      raise RuntimeError(f"non-finite step: {self.metrics}")


def base_config(mode: str, size: str, patch_length: int, batch: int, packing: bool):
  from notagen_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config(mode, size)
  c.model.patch_length = patch_length
  c.model.char_packing = packing
  c.data.batch_size = batch
  c.mesh.shape = (1, 1, 1)
  return c


# ------------------------------------------------------------------------------------------------
# PyTorch: the original's DPO step.


class TorchDpoStep(Timed):
  """NotaGen's DPO step as the original writes it, on the transformers GPT-2 reference model."""

  def __init__(self, policy, pair: dict, beta: float = 0.1, lam: float = 10.0, lr: float = 1e-6):
    import copy  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    self.torch = torch
    self.policy = policy.train()  # the original never calls eval(): dropout on everywhere
    self.reference = copy.deepcopy(policy).train()
    for p in self.reference.parameters():
      p.requires_grad_(False)
    self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=lr)
    self.beta, self.lam = beta, lam
    self.inputs = []
    for name in ("chosen", "rejected"):
      n = int(pair[f"{name}_masks"][0].sum())
      patches = torch.from_numpy(pair[name][0, :n]).long().reshape(1, -1)
      self.inputs.append((patches, torch.ones(1, n, dtype=torch.long)))
    self.times: list[float] = []
    self.cpu_times: list[float] = []
    self.loss = float("nan")

  def _step(self) -> None:
    torch = self.torch
    (chosen, chosen_masks), (rejected, rejected_masks) = self.inputs
    policy_chosen = self.policy(chosen, chosen_masks)["sum_logprob"]
    policy_rejected = self.policy(rejected, rejected_masks)["sum_logprob"]
    with torch.no_grad():
      ref_chosen = self.reference(chosen, chosen_masks)["sum_logprob"]
      ref_rejected = self.reference(rejected, rejected_masks)["sum_logprob"]
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    logits = logits - self.lam * torch.relu(ref_chosen - policy_chosen)
    loss = -torch.nn.functional.logsigmoid(self.beta * logits)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
    self.optimizer.step()
    self.policy.zero_grad(set_to_none=True)
    self.loss = float(loss.detach())
    if not math.isfinite(self.loss):
      raise RuntimeError(f"non-finite torch loss {self.loss}")


# ------------------------------------------------------------------------------------------------


def _interleave(runners: list, rounds: int) -> None:
  for _ in range(rounds):
    for runner in runners:
      runner.run()


def _fmt(seconds: list[float]) -> str:
  return " ".join(f"{s:.2f}" for s in seconds)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=3, help="timed tiny pre-training steps")
  parser.add_argument("--small-steps", type=int, default=1, help="timed small pre-training steps")
  parser.add_argument("--dpo-steps", type=int, default=2,
                      help="timed DPO steps per variant (after one warm-up step each)")
  parser.add_argument("--tiny-batch", type=int, default=8)
  parser.add_argument("--tiny-patches", type=int, default=256, help="tiny patch_length")
  parser.add_argument("--small-batch", type=int, default=1)
  parser.add_argument("--small-patches", type=int, default=1024,
                      help="small pre-training row length (real patches, no padding); the "
                      "model's own 2048 takes ~5 min more here")
  parser.add_argument("--dpo-chosen", type=int, default=253, help="patches of the chosen piece")
  parser.add_argument("--dpo-rejected", type=int, default=256,
                      help="patches of the rejected piece")
  parser.add_argument("--dpo-pad", type=int, default=0,
                      help="DPO row length (0: the pieces' longest, rounded up to 64)")
  parser.add_argument("--torch-attn", default="eager",
                      help="comma list of transformers attention implementations for the PyTorch "
                      "step (eager, sdpa); the first is the ratios' basis. The original pins "
                      "transformers 4.40, whose GPT-2 has only eager attention")
  parser.add_argument("--skip", default="",
                      help="comma list of parts to skip: tiny, small, dpo, dpo-reference, torch")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--golden", default=str(ROOT / "tests" / "golden"))
  args = parser.parse_args(argv)
  machine.print_header()
  skip = set(filter(None, args.skip.split(",")))
  _setup_threads(args.threads)

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from notagen_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from notagen_jax import torch_port  # pylint: disable=import-outside-toplevel
  from notagen_jax import trainer  # pylint: disable=import-outside-toplevel
  import reference  # pylint: disable=import-outside-toplevel
  torch_reference = reference.torch_reference()

  torch.set_num_threads(args.threads)
  texts = _texts(pathlib.Path(args.golden))
  peaks = [peak_matmul_flops()]
  print(f"# {jax.devices()[0].device_kind} ({os.cpu_count()} cores), {args.threads} threads, "
        f"jax {jax.__version__}, torch {torch.__version__}; float32 everywhere; peak matmul "
        f"{peaks[0] / 1e9:.1f} GFLOP/s (best jnp f32 matmul of 2048^3, 1024x768x3072, "
        "1024x3072x768; measured again after the pre-training and the DPO parts, MFU uses the "
        "highest)", flush=True)
  lengths: dict[tuple[int, ...], int] = {}
  rows = []  # dicts: name, shape, runner, flops (useful, per step), trainer_flops, chars, torch

  with supplied_packed_len(lengths):
    # -- pre-training steps ---------------------------------------------------------------------
    for size in SIZES_ORDER:
      if size in skip:
        continue
      if size == "tiny":
        batch_size, length = args.tiny_batch, args.tiny_patches
        batch = pretrain_batch(texts, batch_size, length)
        shape = f"B={batch_size} L={length}"
      else:
        batch_size, length = args.small_batch, args.small_patches
        row = long_row(texts, length)
        batch = {k: np.repeat(v, batch_size, axis=0) for k, v in row.items()}
        shape = f"B={batch_size} L={length} (1 row, concatenated pieces)"
      lengths[batch["patches"].shape] = model_lib.packed_length(batch["patches"], batch["masks"])
      c = base_config("pretrain", size, length, batch_size, packing=True)
      runner = JaxStep(c, batch)
      compile_s = runner.run(record=False)
      _interleave([runner], args.steps if size == "tiny" else args.small_steps)
      cfg = runner.setup.model_cfg
      flops = 3 * useful_forward_flops(cfg, batch["patches"], batch["masks"])
      trainer_flops = 3 * trainer.forward_flops(cfg, length) * batch_size
      n_chars = runner.metrics["n_chars"]
      pad = 1 - n_chars / (batch["masks"].sum() * cfg.patch_size)
      rows.append(dict(name=f"{size} pretrain (jax, packed)", shape=shape, runner=runner,
                       flops=flops, trainer_flops=trainer_flops, chars=n_chars, torch=None))
      print(f"#   {size} pretrain: first step (compile) {compile_s:.1f} s, steps "
            f"{_fmt(runner.times)} s (CPU {_fmt(runner.cpu_times)} s), {n_chars:.0f} target "
            f"chars/step ({pad:.0%} of real char slots are pad), "
            f"packed_len {lengths[batch['patches'].shape]}, loss {runner.metrics['loss']:.3f}; "
            f"load average {os.getloadavg()[0]:.1f}", flush=True)
      runner.state = runner.setup = runner.step = runner.batch = None  # free the memory
    if not {"tiny", "small"} <= skip:
      peaks.append(peak_matmul_flops())

    # -- DPO ------------------------------------------------------------------------------------
    if "dpo" not in skip:
      from notagen_jax.data import pipeline  # pylint: disable=import-outside-toplevel
      pad = args.dpo_pad or -(-max(args.dpo_chosen, args.dpo_rejected) // 64) * 64
      chosen = pipeline.pad_rows(encode(texts["mozart-C"], args.dpo_chosen), pad)
      rejected = pipeline.pad_rows(encode(texts["joplin-C"], args.dpo_rejected), pad)
      pair = {"chosen": chosen["patches"][None], "chosen_masks": chosen["masks"][None],
              "rejected": rejected["patches"][None], "rejected_masks": rejected["masks"][None]}
      both = np.concatenate([pair["chosen"], pair["rejected"]])
      both_masks = np.concatenate([pair["chosen_masks"], pair["rejected_masks"]])
      lengths[both.shape] = model_lib.packed_length(both, both_masks)

      # The original's small model with torch's init; the JAX runs start from the same weights.
      small = model_lib.SIZES["small"]
      torch.manual_seed(0)
      weights = torch_reference.NotaGen(*small).state_dict()
      tmp = tempfile.TemporaryDirectory()
      init = pathlib.Path(tmp.name) / "small_init.pth"
      torch_port.save_pth({k: v.detach().numpy() for k, v in weights.items()}, init)

      def dpo_config(precompute: bool):
        c = base_config("dpo", "small", pad, 1, packing=True)
        c.init_checkpoint = str(init)
        c.dpo.precompute_reference = precompute
        # The original's policy and reference run with dropout on; a precomputed reference has
        # none, and then neither has the policy (the trainer's default).
        c.dpo.reference_dropout = not precompute
        c.model.dropout = 0.0 if precompute else 0.1
        return c

      # Reference log-probs, computed once per pair (dropout off), as trainer's precompute does.
      precomputed = JaxStep(dpo_config(True), {**pair, "ref_chosen_logp": np.zeros(1, np.float32),
                                               "ref_rejected_logp": np.zeros(1, np.float32)})
      setup = precomputed.setup
      merge = trainer._model  # pylint: disable=protected-access
      logps = jax.jit(lambda params, p, m: model_lib.forward(
          merge(setup, params), p, m, deterministic=True,
          packed_len=lengths[both.shape]).sum_logprob)
      jax.block_until_ready(logps(setup.state.params, both, both_masks))  # compile
      start = time.perf_counter()
      ref = np.asarray(jax.block_until_ready(logps(setup.state.params, both, both_masks)))
      precompute_s = time.perf_counter() - start
      precomputed.batch = precomputed.batch | {
          name: jax.device_put(np.asarray([value], np.float32), precomputed.batch[name].sharding)
          for name, value in (("ref_chosen_logp", ref[0]), ("ref_rejected_logp", ref[1]))}

      runners = [("jax: precomputed ref + char packing", precomputed)]
      if "dpo-reference" not in skip:
        runners.append(("jax: reference forward each step", JaxStep(dpo_config(False), pair)))
      torch_names = []
      if "torch" not in skip:
        for attn in args.torch_attn.split(","):
          policy = torch_reference.NotaGen(*small, attn_implementation=attn)
          policy.load_state_dict(weights)
          torch_names.append(f"torch: original step ({attn} attn)")
          runners.append((torch_names[-1], TorchDpoStep(policy, pair)))
      warm = {name: r.run(record=False) for name, r in runners}
      _interleave([r for _, r in runners], args.dpo_steps)
      baseline = dict(runners)[torch_names[0]] if torch_names else None
      cfg = precomputed.setup.model_cfg
      flops = 3 * useful_forward_flops(cfg, both, both_masks)
      ref_flops = useful_forward_flops(cfg, both, both_masks)
      n_chars = precomputed.metrics["n_chars"]
      shape = f"{args.dpo_chosen}+{args.dpo_rejected} patches, rows padded to {pad}"
      for name, r in runners:
        work = flops + (ref_flops if "reference" in name or "torch" in name else 0.0)
        rows.append(dict(name=f"small DPO {name}", shape=shape, runner=r, flops=work,
                         trainer_flops=None, chars=n_chars, torch=baseline))
        print(f"#   {name}: warm-up step {warm[name]:.1f} s, steps {_fmt(r.times)} s, CPU "
              f"{_fmt(r.cpu_times)} s", flush=True)
      print(f"#   reference log-probs of the pair (one forward of both, dropout off, once per pair "
            f"per run): {precompute_s:.2f} s; packed_len {lengths[both.shape]}; {n_chars:.0f} "
            f"target chars per pair; load average {os.getloadavg()[0]:.1f}", flush=True)
      tmp.cleanup()
      peaks.append(peak_matmul_flops())

  peak = max(peaks)
  print(f"# peak matmul measurements: {', '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s. "
        "s/step: best wall time of the timed steps; CPU s: median CPU time of this process per "
        "step (all threads);\n# within a part all variants run interleaved, round by round, in "
        "this one run; vs torch: PyTorch's time over this row's, wall (best) and CPU (median)")
  print("# TFLOP/s, MFU: useful work, 3x the forward matmul FLOPs of the real patches and real "
        "target chars (+1x for a reference forward), over the best wall time;\n# trainer MFU: "
        "what train_and_evaluate would log, 3x trainer.forward_flops(cfg, patch_length) x batch "
        "(padding and all 16 char positions per patch)")
  print()
  header = (f"{'step':48} {'shape':42} {'s/step':>7} {'CPU s':>7} {'chars/s':>8} "
            f"{'TFLOP/s':>8} {'MFU':>6} {'trainer MFU':>11} {'vs torch wall':>13} {'CPU':>6}")
  print(header)
  print("-" * len(header))
  for row in rows:
    seconds, cpu = min(row["runner"].times), statistics.median(row["runner"].cpu_times)
    trainer_mfu = ("" if row["trainer_flops"] is None
                   else f"{row['trainer_flops'] / seconds / peak:.1%}")
    wall_ratio = cpu_ratio = ""
    if row["torch"] is not None:
      wall_ratio = f"{min(row['torch'].times) / seconds:.2f}x"
      cpu_ratio = f"{statistics.median(row['torch'].cpu_times) / cpu:.2f}x"
    print(f"{row['name']:48} {row['shape']:42} {seconds:7.2f} {cpu:7.2f} "
          f"{row['chars'] / seconds:8.0f} {row['flops'] / seconds / 1e12:8.4f} "
          f"{row['flops'] / seconds / peak:6.1%} {trainer_mfu:>11} {wall_ratio:>13} {cpu_ratio:>6}")
  if "dpo" not in skip and torch_names:
    ours = runners[0][1]
    torch_wall, ours_wall = min(baseline.times), min(ours.times)
    torch_cpu, ours_cpu = statistics.median(baseline.cpu_times), statistics.median(ours.cpu_times)
    print(f"\nDPO step per pair, same run ({torch_names[0]} vs {runners[0][0]}): PyTorch "
          f"{torch_wall:.2f} s wall / {torch_cpu:.2f} CPU s, JAX {ours_wall:.2f} s "
          f"wall / {ours_cpu:.2f} CPU s -> {torch_wall / ours_wall:.2f}x wall, "
          f"{torch_cpu / ours_cpu:.2f}x CPU time; with the one-off reference "
          f"precompute ({precompute_s:.2f} s) added to one epoch: "
          f"{torch_wall / (ours_wall + precompute_s):.2f}x wall")


if __name__ == "__main__":
  main(sys.argv[1:])
