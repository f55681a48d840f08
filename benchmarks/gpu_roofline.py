"""Where a GPU's train step time goes, read off the program XLA:GPU compiles for it on this CPU.

    PYTHONPATH=build/jax-cuda-plugin python benchmarks/gpu_roofline.py \
        --train=large:pretrain:bfloat16:8,large:dpo:bfloat16:1 --gpu=h200 --matmul_tflops=692

Rows are `benchmarks/accelerator_throughput.py`'s train rows (`SIZE:MODE:DTYPE:ROWS`, one GPU), so
that the two can be set side by side. The step is `planning.lower_step` compiled for one GPU as
`planning.gpu_devices` describes it (JAX's CUDA plugin, no GPU). Every kernel of the compiled
program (each instruction the entry computation launches) takes at least the longer of its matmul
FLOPs at `--matmul_tflops` (default: the datasheet's peak) and the bytes of its operands and
result at the GPU's memory bandwidth (the datasheet's). Summed, that is the step's roofline time:
what the program takes if every kernel ran at its ceiling, and the highest MFU the trainer can
report for it (its model FLOPs, 3 x `trainer.forward_flops` as the planner counts them, over
that time, against the datasheet's peak). The compiled matmuls are the model's and a few more
(one-hot inputs XLA multiplies). Kernels fall in three groups: matmuls whose FLOPs per byte
clear the ridge point (peak / bandwidth), matmuls below it (attention's many small ones), and the
rest (element-wise and reduction fusions, all bounded by memory).

Without a GPU XLA does not autotune, so a run's program may differ in its matmul kernels and what
they fuse: docs/benchmarks.md sets these figures beside steps measured on an H200. The layers must
be unrolled (a scanned stack's loop body is one kernel list run many times), as by default.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

from absl import app
from absl import flags
import jax

from notagen_jax import config as config_lib
from notagen_jax import planning

import machine  # benchmarks/machine.py

_TRAIN = flags.DEFINE_list("train", ["large:pretrain:bfloat16:8", "large:dpo:bfloat16:1"],
                           "SIZE:MODE:DTYPE:ROWS per row (DPO: ROWS pairs).")
_GPU = flags.DEFINE_enum("gpu", "h200", ["h100", "h200", "a100"], "The GPU to compile for.")
_MATMUL_TFLOPS = flags.DEFINE_float("matmul_tflops", None,
                                    "Matmul ceiling in TFLOP/s; default the datasheet's peak.")
_TOP = flags.DEFINE_integer("top", 12, "Also list this many of each row's costliest ops (an op: "
                            "the kernels of one JAX op on the same shapes).")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"(?:ROOT )?%([\w.-]+) = (.+?) ([a-z-]+)\((.*?)\)(?:, (.*))?$")
# Instructions that launch nothing: they name (part of) a buffer another kernel wrote.
_FREE = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}


@dataclasses.dataclass(frozen=True)
class Kernel:
  result: str  # the result's type, e.g. bf16[8192,1280]{1,0}
  op: str  # the JAX op it came from (metadata op_name)
  flops: float  # matmul FLOPs
  bytes: float  # operands read + result written


def _array_bytes(hlo_type: str) -> int:
  return sum(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(hlo_type))


def _dims(hlo_type: str) -> list[int]:
  return [int(d) for d in _ARRAY.search(hlo_type)[2].split(",") if d]


def kernels(hlo: str) -> list[Kernel]:
  """The kernels of an optimized HLO module's entry computation (`compiled.as_text()`)."""
  computations: dict[str, list[re.Match]] = {}
  entry = None
  for line in hlo.splitlines():
    if line.endswith("{") and not line.startswith(" "):
      name = re.match(r"(ENTRY )?%?([\w.-]+)", line)
      current = computations.setdefault(name[2], [])
      entry = name[2] if name[1] else entry
    elif line.startswith("  ") and (m := _INSTRUCTION.match(line.strip())):
      current.append(m)
  types = {m[1]: m[2] for body in computations.values() for m in body}

  def matmul_flops(m: re.Match) -> float:
    """A dot's FLOPs, or those of the dots in the computations an instruction calls."""
    flops = 0.0
    if m[3] == "dot":
      lhs = m[4].split(",")[0].strip().lstrip("%")
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", m[5])[1]
      k = math.prod(_dims(types[lhs])[int(i)] for i in contracting.split(",") if i)
      flops += 2 * math.prod(_dims(m[2])) * k
    for callee in re.findall(r"(?:calls|to_apply)=%([\w.-]+)", m[5] or ""):
      flops += sum(map(matmul_flops, computations[callee]))
    return flops

  result = []
  for m in computations[entry]:
    name, hlo_type, opcode, operands, attributes = m.groups()
    if opcode in _FREE:
      continue
    if opcode in ("while", "call", "conditional"):
      raise ValueError(f"{opcode} {name} in the step: its body's kernels run an unknown number of "
                       "times (scanned layers? set model.scan_layers=False)")
    read = sum(_array_bytes(types.get(o, "")) for o in re.findall(r"%([\w.-]+)", operands))
    op = re.search(r'op_name="([^"]*)"', attributes or "")
    result.append(Kernel(hlo_type, op[1] if op else opcode, matmul_flops(m),
                         read + _array_bytes(hlo_type)))
  return result


@dataclasses.dataclass(frozen=True)
class Roofline:
  peak: float  # matmul FLOP/s
  bandwidth: float  # bytes/s

  def seconds(self, k: Kernel) -> float:
    return max(k.flops / self.peak, k.bytes / self.bandwidth)

  def group(self, k: Kernel) -> str:
    if not k.flops:
      return "other"
    return "matmul" if k.flops / k.bytes >= self.peak / self.bandwidth else "matmul below ridge"


def compiled_step(spec: str, gpu: str) -> tuple[str, float]:
  """(optimized HLO, the planner's model FLOPs) of a row's train step compiled for one `gpu`."""
  size, mode, dtype, rows = spec.split(":")
  c = config_lib.base_config(mode, size)
  c.model.dtype = dtype
  c.data.batch_size, c.data.per_device_batch_size = int(rows), 0
  p = planning.plan(c, devices=f"{gpu}x1", compile=False)
  return planning.lower_step(c, p.mesh_shape, p.topology).compile().as_text(), p.flops_per_step


def report(spec: str, hlo: str, model_flops: float, roofline: Roofline, datasheet: float,
           top: int) -> str:
  ks = kernels(hlo)
  groups = collections.defaultdict(list)
  for k in ks:
    groups[roofline.group(k)].append(k)
  total = sum(map(roofline.seconds, ks))
  matmul_flops = sum(k.flops for k in ks)
  lines = [f"{spec}: {len(ks)} kernels, {matmul_flops / 1e12:.4g} TFLOP of matmuls "
           f"(the model's {model_flops / 1e12:.4g}), roofline {total * 1e3:.1f} ms, "
           f"MFU at most {model_flops / total / datasheet:.1%} of {datasheet / 1e12:.0f} TFLOP/s",
           "", "| kernels | count | TFLOP | GB moved | roofline ms | of the step |",
           "|---|---:|---:|---:|---:|---:|"]
  for name in ("matmul", "matmul below ridge", "other"):
    group = groups[name]
    seconds = sum(map(roofline.seconds, group))
    lines.append(f"| {name} | {len(group)} | {sum(k.flops for k in group) / 1e12:.1f} | "
                 f"{sum(k.bytes for k in group) / 1e9:.1f} | {seconds * 1e3:.1f} | "
                 f"{seconds / total:.0%} |")
  if not top:
    return "\n".join(lines)
  alike = collections.defaultdict(list)  # the same op on the same shapes, in every layer
  for k in ks:
    alike[(k.op, k.result)].append(k)
  lines += ["", "| op (longest in all) | result | kernels | GB moved | TFLOP | roofline ms |",
            "|---|---|---:|---:|---:|---:|"]
  for (op, result), group in sorted(alike.items(), key=lambda kv: -sum(map(roofline.seconds,
                                                                            kv[1])))[:top]:
    lines.append(f"| {op} | `{result}` | {len(group)} | {sum(k.bytes for k in group) / 1e9:.1f} | "
                 f"{sum(k.flops for k in group) / 1e12:.1f} | "
                 f"{sum(map(roofline.seconds, group)) * 1e3:.1f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  machine.print_header()
  jax.config.update("jax_platforms", "cpu")
  target = planning.topology(f"{_GPU.value}x1")
  datasheet = target.peak_flops
  peak = _MATMUL_TFLOPS.value * 1e12 if _MATMUL_TFLOPS.value else datasheet
  roofline = Roofline(peak, planning.gpu_memory_bandwidth(target))
  print(f"# {target.device_kind}: matmuls at {peak / 1e12:.0f} TFLOP/s, memory at "
        f"{roofline.bandwidth / 1e12:.2f} TB/s (ridge {peak / roofline.bandwidth:.0f} FLOP/byte)")
  for spec in _TRAIN.value:
    hlo, model_flops = compiled_step(spec, _GPU.value)
    print("\n" + report(spec, hlo, model_flops, roofline, datasheet, _TOP.value), flush=True)


if __name__ == "__main__":
  app.run(main)
