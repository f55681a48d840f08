"""Generation throughput of the KV-cached, batched sampler against the original's uncached loop.

  python benchmarks/generate_throughput.py [--cases=short,long] [--batches=1,32]
      [--baseline-patches=3] [--dtype=float32,bfloat16,int8] [--patches-per-call=8]
      [--torch-threads=2,1] [--repeats=1]
  python benchmarks/generate_throughput.py --only=constrained [--batches=1,32] [--repeats=2]

The small model (12 patch layers, 3 char layers, H 768), randomly initialized (`model.create`);
both implementations hold the same weights (`checkpoint.export_state_dict` into the PyTorch
reference of tests/torch_reference.py: transformers' GPT-2 with eager attention, as the
transformers 4.40 that the original pins). Sampling as the original's CLaMP-DPO loop: top-k 9,
top-p 0.9, temperature 1.2. Cases:
- short: the prompt `%Baroque\\n%Bach, Johann Sebastian\\n%Choral\\n` (bos + 4 metadata patches
  = 5 patches), then 64 generated patches.
- long: a 500-patch prompt (a golden chorale's metadata, then the three golden chorales' body
  lines over and over, cut where it encodes to exactly 500 whole patches), then 64 patches.
Each piece is stopped after 64 patches (`Settings(max_patches=64)`; random weights rarely end a
piece earlier), so every row draws 64 x 16 characters. chars/s counts the characters drawn over
the whole `Sampler.run` (prompt encoding included), after a first run that compiles; batch B runs
B copies of the prompt at once (aggregate chars/s). `--dtype` gives one row per Sampler dtype
(the blocks' matrices stored in that dtype, `inference.weights.store`; sums in float32; int8 with
a scale per 32 input rows; at batch 1 on a CPU both narrow dtypes take `cpu_kernels`'s kernels).

Baseline, the original's `inference.py` loop: for every patch the whole patch-level decoder over
the context, then for every character the char-level decoder over [patch output, chars so far],
numpy top-k / top-p / temperature, one piece at a time. It is slow, so only `--baseline-patches`
patches (after a warm-up patch) are timed; its batch-B rate is its batch-1 rate. With several
`--torch-threads` the fastest counts: on a loaded machine two torch threads can be far slower
than one (threads spinning at barriers while the other core is taken).

Limits, measured in the same run (the best seen before and after the rows): memory bandwidth
(numpy sums over 512 MB, a slice per core on its own thread, best of 3) and the peak matmul rate
(`model_throughput.peak_meter`'s matmuls, in each row's dtype with float32 sums as the sampler's;
int8 rows' larger batches dequantize to bfloat16, so bfloat16's). Batch 1 is bound by bytes: each
character reads the char decoder's weights, 1/16 of the patch decoder's, and the used part of both
KV caches (on a CPU `cpu_kernels.attention` reads no more; elsewhere XLA reads the whole cache
bucket); over 100% means some weights came from the L3 cache rather than DRAM. Larger
batches are bound by the matmul rate: FLOPs = 2 x the matmul parameters per character (char
decoder and LM head, 1/16 of the patch decoder and its input Linear) plus the attention over the
used cache, times the aggregate chars/s. Compile time (JAX's compile events during the first run)
is reported apart; a row reusing shapes compiled before shows less.

`--only=constrained`: what `Settings(constrained=True)` costs (the automaton's mask on every drawn
character, `constraint.admissible` inside the compiled char loop), on the same small float32 model,
the short prompt (the long one repeats body lines, which the automaton does not admit: their `[r:i`
would not count the lines) and `max_patches` 64 (a constrained piece then finishes its line),
against the unconstrained sampler, timed runs interleaved (the best of `--repeats` each).
Constrained pieces of a random model end early (a bos-eos patch after a complete line) or late,
so the rates are per character, in two counts: drawn (the
characters the pieces got) and slots (batch x 16 x the patches of every compiled call, rows whose
piece has ended included: the work the compiled loop does, which is what the automaton adds to;
a run makes as many calls as its longest piece needs). The ratio is constrained / unconstrained
time per character. Then `constraint.admissible` alone, jitted over a batch of states for a
patch's 16 positions, with its mask alone (the next states unused, so XLA drops them) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import machine  # benchmarks/machine.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHORT_PROMPT = "%Baroque\n%Bach, Johann Sebastian\n%Choral\n"
NEW_PATCHES = 64


def _setup_threads(threads: int) -> None:
  # Before jax / torch start their thread pools; XLA's CPU client uses every core.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["OMP_NUM_THREADS"] = str(threads)


def long_prompt(golden: pathlib.Path, patchilizer, n_patches: int = 500) -> str:
  """Real ABC that encodes to exactly n_patches whole patches (no open last patch)."""
  from notagen_jax import sampling  # pylint: disable=import-outside-toplevel
  from notagen_jax.data import tokenizer  # pylint: disable=import-outside-toplevel
  cases = json.loads((golden / "cases.json").read_text())["cases"]
  lines = tokenizer.text_lines(cases[0]["stream_text"])
  head = "".join(line for line in lines if not line.startswith("[r:"))
  body = [line for case in cases for line in tokenizer.text_lines(case["stream_text"])
          if line.startswith("[r:")]
  text, n_lines = head, 0
  while len(sampling.split_prompt(patchilizer, text)[0]) < n_patches + 2:
    text += body[n_lines % len(body)]
    n_lines += 1
  # Patch counts are not monotone in the cut point (bars split at 16 chars), so search down.
  for end in range(len(text), len(head), -1):
    ids, prefix, _ = sampling.split_prompt(patchilizer, text[:end])
    if len(ids) == n_patches and not len(prefix):
      return text[:end]
    if len(ids) < n_patches - 16:
      break
  raise ValueError(f"no cut of the golden text gives exactly {n_patches} whole patches")


# ------------------------------------------------------------------------------------------------
# The original: NotaGen's `generate` and `inference.py` loop, on the PyTorch reference.


def _original_filters(probs, top_k: int, top_p: float, temperature: float, rng):
  """The `samplings` package's top_k_sampling, top_p_sampling, temperature_sampling."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  probs = np.array(probs, np.float64)
  probs[np.argsort(probs)[::-1][top_k:]] = 0.0
  probs /= probs.sum()
  order = np.argsort(probs)[::-1]
  cutoff = np.where(np.cumsum(probs[order]) > top_p)[0][0]
  probs[order[cutoff + 1:]] = 0.0
  probs /= probs.sum()
  probs = probs ** (1.0 / temperature)
  return int(rng.choice(len(probs), p=probs / probs.sum()))


class OriginalLoop:
  """One piece at a time, no cache: the patch decoder over the whole context for every patch and
  the char decoder over the whole patch so far for every character."""

  def __init__(self, reference, settings, patch_size: int, seed: int = 0):
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    self.torch = torch
    self.reference = reference
    self.settings = settings
    self.patch_size = patch_size
    self.rng = np.random.default_rng(seed)

  def _patch(self, context: list[list[int]], prefix: list[int]) -> list[int]:
    """NotaGen's `generate`: the 16 - len(prefix) characters after `prefix`."""
    torch, char = self.torch, self.reference.char_level_decoder.base
    patches = torch.tensor(context, dtype=torch.long)[None]
    encoded = self.reference.patch_level_decoder(patches)[0, -1].reshape(1, 1, -1)
    tokens = [1] + prefix  # bos, then the given chars
    drawn = []
    while True:
      embeds = char.transformer.wte(torch.tensor([tokens]))
      logits = char(inputs_embeds=torch.cat((encoded, embeds[:, 1:]), dim=1)).logits
      probs = torch.softmax(logits[0, -1], dim=-1).numpy()
      s = self.settings
      drawn.append(_original_filters(probs, s.top_k, s.top_p, s.temperature, self.rng))
      if len(tokens) >= self.patch_size:
        return drawn
      tokens.append(drawn[-1])

  def run(self, context: list[list[int]], in_body: bool, n_patches: int) -> int:
    """Appends n_patches patches to `context` as `inference.py` does; returns the chars drawn."""
    chars = 0
    with self.torch.no_grad():
      for _ in range(n_patches):
        patch = self._patch(context, [])
        chars += len(patch)
        if not in_body and bytes(patch[:3]) == b"[r:":
          in_body = True
          forced = [ord(c) for c in "[r:0/"]
          patch = forced + self._patch(context, forced)
          chars += self.patch_size - len(forced)
        context.append(patch)
    return chars


def time_original(reference, settings, prompt_ids, in_body: bool, n_patches: int,
                  threads: int) -> float:
  """chars/s of the original loop: one warm-up patch, then n_patches timed."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  loop = OriginalLoop(reference, settings, len(prompt_ids[0]))
  context = [list(map(int, row)) for row in prompt_ids]
  loop.run(context, in_body, 1)
  start = time.perf_counter()
  chars = loop.run(context, in_body, n_patches)
  return chars / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# Limits and the work per character.


def memory_bandwidth(megabytes: int = 512, repeats: int = 3) -> float:
  """Bytes/s of numpy sums over a float32 array of `megabytes`, one slice per core summed on its
  own thread (numpy releases the GIL), best of `repeats`: every core reading, as the sampler's
  kernels do (one thread alone reached ~70% of it here)."""
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  array = np.ones(megabytes * 2**20 // 4, np.float32)
  slices = np.array_split(array, os.cpu_count() or 1)
  best = float("inf")
  with concurrent.futures.ThreadPoolExecutor(len(slices)) as pool:
    for _ in range(repeats):
      start = time.perf_counter()
      list(pool.map(np.sum, slices))
      best = min(best, time.perf_counter() - start)
  return array.nbytes / best


def peak_meter(dtype: str, shapes=((2048, 2048, 2048), (4096, 768, 3072), (4096, 3072, 768))):
  """`model_throughput.peak_meter` with operands in `dtype`: a function measuring the best FLOP/s
  of jnp matmuls (m, k, n) of a few shapes, summing in float32 (as `weights.inference_matmul`)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  operands = [(jax.random.normal(jax.random.key(0), (m, k), dtype),
               jax.random.normal(jax.random.key(1), (k, n), dtype)) for m, k, n in shapes]

  def measure(repeats: int = 3) -> float:
    best = 0.0
    for a, b in operands:
      matmul(a, b).block_until_ready()  # compile / warm up
      for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = max(best, 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - start))
    return best

  return measure


def work_per_char(cfg, params, context: float) -> tuple[float, float]:
  """(bytes read, FLOPs) per generated character of one row; `context` the mean patch context.

  Bytes: the char decoder's weights, 1/16 of the patch decoder's, and the used KV cache (char:
  positions 0..15, so 8.5 keys and values on average; patch: context + 1 per patch, over 16).
  FLOPs: 2 x matmul parameters (blocks 12 H^2 each, LM head V H; patch decoder and its 2048 -> H
  input Linear over 16) + attention 4 H per key per layer.
  """
  import jax  # pylint: disable=import-outside-toplevel
  h, p = cfg.hidden, cfg.patch_size
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  itemsize = jax.numpy.dtype(cfg.dtype).itemsize
  char_keys, patch_keys = (p + 1) / 2, context + 1
  kv = 2 * h * itemsize * (cfg.char_layers * char_keys + cfg.patch_layers * patch_keys / p)
  bytes_read = nbytes(params["char"]) + nbytes(params["patch"]) / p + kv
  block = 12 * h * h
  char_flops = 2 * (cfg.char_layers * block + cfg.vocab * h) + 4 * h * cfg.char_layers * char_keys
  patch_flops = (2 * (cfg.patch_layers * block + p * cfg.vocab * h)
                 + 4 * h * cfg.patch_layers * patch_keys)
  return bytes_read, char_flops + patch_flops / p


# ------------------------------------------------------------------------------------------------


def matmul_dtype(weights_dtype: str) -> str:
  """The operand dtype of the sampler's products above the kernels' rows: int8 is dequantized to
  bfloat16 (`weights.inference_matmul`)."""
  return "bfloat16" if weights_dtype == "int8" else weights_dtype


def compile_seconds() -> list[float]:
  """A list that JAX's compile events (tracing, lowering, XLA) add their seconds to from now on."""
  import jax  # pylint: disable=import-outside-toplevel
  total = [0.0]

  def listen(event: str, seconds: float, **_) -> None:
    if event.startswith("/jax/core/compile/"):
      total[0] += seconds

  jax.monitoring.register_event_duration_secs_listener(listen)
  return total


def time_sampler(model, prompt: str, batch: int, settings, patches_per_call: int,
                 dtype: str, repeats: int, compiled: list[float]):
  """(sampler, compile s, best timed run s, chars drawn per run) of `Sampler.run`; the first run
  compiles (its compile seconds from `compiled`, a `compile_seconds()` list) and is not timed."""
  from notagen_jax import sampling  # pylint: disable=import-outside-toplevel
  sampler = sampling.Sampler(model, settings, batch=batch, patches_per_call=patches_per_call,
                             dtype=dtype)
  before = compiled[0]
  sampler.run([prompt] * batch, seed=0)
  compile_s = compiled[0] - before
  best, chars = float("inf"), 0
  for seed in range(1, repeats + 1):
    start = time.perf_counter()
    results = sampler.run([prompt] * batch, seed=seed)
    best = min(best, time.perf_counter() - start)
    chars = sum(r.patches for r in results) * model.cfg.patch_size
    if any(r.patches != NEW_PATCHES for r in results):
      print(f"#   note: pieces of {sorted({r.patches for r in results})} patches "
            f"({[r.reason for r in results][:3]})", flush=True)
  return sampler, compile_s, best, chars


def slots(results, batch: int, max_patches: int, patches_per_call: int) -> int:
  """Characters the compiled loop computed in a `Sampler.run` of `batch` rows: every call draws
  patches_per_call patches for every row, and a piece not stopped at max_patches also drew the
  patch that ended it (its bos-eos patch, or the one the automaton found no character for)."""
  drawn = max(r.patches + (r.patches < max_patches) for r in results)
  return -(-drawn // patches_per_call) * patches_per_call * batch * 16


def time_admissible(batch: int, repeats: int = 20) -> tuple[float, float]:
  """Seconds per character step of `constraint.admissible` over `batch` states (best of
  `repeats` patches of 16 steps): (with the next states, the mask alone)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from notagen_jax import constraint  # pylint: disable=import-outside-toplevel
  states = constraint.batch([constraint.initial()] * batch)

  def patch(mask_only: bool):
    def body(t, carry):
      following, admitted = constraint.admissible(states_in(carry), t)
      if mask_only:
        return carry + admitted.sum()
      # Every next state and the mask feed the carry, so none of them is dropped.
      return carry + admitted.sum() + sum(x.astype(jnp.int32).sum()
                                          for x in jax.tree.leaves(following))
    # The states come from the carry so that XLA cannot hoist the steps out of the loop.
    states_in = lambda carry: jax.tree.map(lambda x: jnp.where(carry < 0, jnp.zeros_like(x), x), states)
    return jax.jit(lambda: jax.lax.fori_loop(0, 16, body, jnp.int32(0)))

  times = []
  for mask_only in (False, True):
    run = patch(mask_only)
    run().block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      run().block_until_ready()
      best = min(best, time.perf_counter() - start)
    times.append(best / 16)
  return times[0], times[1]


def compare_constrained(args) -> None:
  """The `--only=constrained` table (see the module docstring)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from notagen_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from notagen_jax import sampling  # pylint: disable=import-outside-toplevel
  cfg = model_lib.config_for("small")
  model = model_lib.create(cfg)
  plain = sampling.Settings(max_patches=NEW_PATCHES)
  variants = {"unconstrained": plain, "constrained": dataclasses.replace(plain, constrained=True)}
  ppc = args.patches_per_call
  print(f"# {jax.devices()[0].device_kind} ({os.cpu_count()} cores), jax {jax.__version__}; small "
        f"model {cfg.patch_layers}/{cfg.char_layers}/{cfg.hidden}, float32; short prompt; "
        f"max_patches {NEW_PATCHES}, {ppc} patches per call; load average "
        f"{os.getloadavg()[0]:.1f}", flush=True)
  rows = []
  for batch in map(int, args.batches.split(",")):
    prompts = [SHORT_PROMPT] * batch
    samplers = {}
    for name, settings in variants.items():
      start = time.perf_counter()
      samplers[name] = sampling.Sampler(model, settings, batch=batch, patches_per_call=ppc,
                                        dtype="float32")
      samplers[name].run(prompts, seed=0)
      print(f"#   batch {batch} {name}: first run (compiles) {time.perf_counter() - start:.1f} s",
            flush=True)
    best = {name: (float("inf"), 0, 0, []) for name in variants}
    for seed in range(1, args.repeats + 1):
      for name, sampler in samplers.items():
        start = time.perf_counter()
        results = sampler.run(prompts, seed=seed)
        seconds = time.perf_counter() - start
        drawn = sum(r.patches for r in results) * cfg.patch_size
        computed = slots(results, batch, NEW_PATCHES, ppc)
        print(f"#   batch {batch} {name} seed {seed}: {seconds:.2f} s, {drawn} chars drawn, "
              f"{computed} slots, pieces of {sorted({r.patches for r in results})} patches; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        if seconds / computed < best[name][0] / max(best[name][2], 1):
          best[name] = (seconds, drawn, computed, [r.patches for r in results])
    rows.append((batch, best, time_admissible(batch)))
  print()
  header = (f"{'batch':>5} {'unconstr. chars/s':>17} {'constr. chars/s':>15} {'ratio':>6} "
            f"{'unconstr. slots/s':>17} {'constr. slots/s':>15} {'ratio':>6} "
            f"{'admissible ms':>13} {'mask ms':>7} {'step ms':>7}")
  print(header)
  print("-" * len(header))
  for batch, best, (admissible_s, mask_s) in rows:
    (u_s, u_drawn, u_slots, _), (c_s, c_drawn, c_slots, _) = best.values()
    step_ms = 1e3 * u_s / u_slots * batch
    print(f"{batch:5d} {u_drawn / u_s:17.1f} {c_drawn / c_s:15.1f} "
          f"{(c_s / c_drawn) / (u_s / u_drawn):5.2f}x {u_slots / u_s:17.1f} {c_slots / c_s:15.1f} "
          f"{(c_s / c_slots) / (u_s / u_slots):5.2f}x {1e3 * admissible_s:13.3f} "
          f"{1e3 * mask_s:7.3f} {step_ms:7.2f}")
  print("# ratio: constrained / unconstrained time per character; admissible, mask: "
        "`constraint.admissible` alone per character step of the batch (next states and mask, "
        "mask alone); step: the unconstrained sampler's time per character step of the batch")


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default="short,long")
  parser.add_argument("--batches", default="1,32")
  parser.add_argument("--baseline-patches", type=int, default=3,
                      help="patches the original's loop is timed for (after one warm-up patch)")
  parser.add_argument("--dtype", default="float32",
                      help="comma list of Sampler dtypes (float32, bfloat16, int8): one row each")
  parser.add_argument("--patches-per-call", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (best counts)")
  parser.add_argument("--torch-threads", default="2,1",
                      help="comma list of torch thread counts for the baseline; the fastest counts")
  parser.add_argument("--golden", default=str(ROOT / "tests" / "golden"))
  parser.add_argument("--only", choices=("constrained",),
                      help="run only the constrained-against-unconstrained comparison")
  args = parser.parse_args(argv)
  machine.print_header()
  threads = [int(t) for t in args.torch_threads.split(",")]
  _setup_threads(max(threads))
  if args.only == "constrained":
    compare_constrained(args)
    return

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from notagen_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from notagen_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from notagen_jax import sampling  # pylint: disable=import-outside-toplevel
  from notagen_jax.data import tokenizer  # pylint: disable=import-outside-toplevel
  import reference  # pylint: disable=import-outside-toplevel
  torch_reference = reference.torch_reference()

  compiled = compile_seconds()
  dtypes = args.dtype.split(",")
  meters = {matmul_dtype(d): peak_meter(matmul_dtype(d)) for d in dtypes}
  peaks = {dtype: [measure()] for dtype, measure in meters.items()}
  bandwidths = [memory_bandwidth()]
  cfg = model_lib.config_for("small")
  model = model_lib.create(cfg)
  reference = torch_reference.from_state_dict(
      {k: torch.from_numpy(np.array(v)) for k, v in checkpoint.export_state_dict(model).items()},
      attn_implementation="eager")
  settings = sampling.Settings(max_patches=NEW_PATCHES)
  patchilizer = tokenizer.Patchilizer(patch_size=cfg.patch_size, patch_length=cfg.patch_length)
  prompts = {"short": SHORT_PROMPT, "long": long_prompt(pathlib.Path(args.golden), patchilizer)}
  print(f"# {jax.devices()[0].device_kind} ({os.cpu_count()} cores), jax {jax.__version__}, "
        f"torch {torch.__version__}; small model "
        f"{cfg.patch_layers}/{cfg.char_layers}/{cfg.hidden}; "
        f"top-k {settings.top_k}, top-p {settings.top_p}, T {settings.temperature}; "
        f"{NEW_PATCHES} patches per piece; load average {os.getloadavg()[0]:.1f}", flush=True)

  rows = []
  for case in args.cases.split(","):
    ids, _, in_body = sampling.split_prompt(patchilizer, prompts[case])
    original = {}
    for n in threads:
      original[n] = time_original(reference, settings, ids, in_body, args.baseline_patches, n)
      print(f"#   {case} ({len(ids)}-patch prompt): original loop, {n} torch threads: "
            f"{original[n]:.2f} chars/s ({args.baseline_patches} patches)", flush=True)
    baseline = max(original.values())
    for dtype in dtypes:
      for batch in map(int, args.batches.split(",")):
        sampler, compile_s, seconds, chars = time_sampler(
            model, prompts[case], batch, settings, args.patches_per_call, dtype, args.repeats,
            compiled)
        bytes_read, flops = work_per_char(cfg, sampler.params, len(ids) + NEW_PATCHES / 2)
        rows.append(dict(case=case, batch=batch, dtype=dtype, rate=chars / seconds,
                         baseline=baseline, compile=compile_s, bytes=bytes_read, flops=flops))
        print(f"#   {case} batch {batch} {dtype}: compile {compile_s:.1f} s, run {seconds:.1f} s "
              f"for {chars} chars; load average {os.getloadavg()[0]:.1f}", flush=True)
  for dtype, measure in meters.items():
    peaks[dtype].append(measure())
  bandwidths.append(memory_bandwidth())
  bandwidth = max(bandwidths)
  print(f"# limits: memory bandwidth {bandwidth / 1e9:.1f} GB/s (numpy sums of 512 MB, a thread "
        f"per core; measured "
        f"{', '.join(f'{b / 1e9:.1f}' for b in bandwidths)}); peak matmul "
        + "; ".join(f"{dtype} {max(p) / 1e12:.3f} TFLOP/s (measured "
                    f"{', '.join(f'{x / 1e12:.3f}' for x in p)})" for dtype, p in peaks.items()))
  print("# original: its batch-1 rate at every batch (one piece at a time); batch 1: GB/s of the "
        "bytes a character must read, batch > 1: FLOP/s of the matmul and attention work")
  print()
  header = (f"{'case':6} {'batch':>5} {'dtype':9} {'JAX chars/s':>11} {'orig chars/s':>12} "
            f"{'ratio':>7} {'achieved':>14} {'% limit':>7} {'compile s':>9}")
  print(header)
  print("-" * len(header))
  for r in rows:
    if r["batch"] == 1:
      achieved = r["bytes"] * r["rate"]
      shown, limit = f"{achieved / 1e9:.1f} GB/s", achieved / bandwidth
    else:
      achieved = r["flops"] * r["rate"]
      shown, limit = (f"{achieved / 1e12:.3f} TFLOP/s",
                       achieved / max(peaks[matmul_dtype(r["dtype"])]))
    print(f"{r['case']:6} {r['batch']:5d} {r['dtype']:9} {r['rate']:11.1f} {r['baseline']:12.2f} "
          f"{r['rate'] / r['baseline']:6.1f}x {shown:>14} {limit:7.0%} {r['compile']:9.1f}")


if __name__ == "__main__":
  main(sys.argv[1:])
