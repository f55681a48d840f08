"""The machine a benchmark runs on, for the first line of its output: the CPU model (with family,
model and stepping, which name an x86 CPU when a VM reports a bare "AMD EPYC"), the logical cores,
the last-level cache and the load average when the run starts. Imported by the scripts as
`import machine` (they run as `python benchmarks/x.py`, which puts this folder on the path)."""

import os
import pathlib
import platform


def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
  fields = {}
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return fields
  for line in text.split("\n\n")[0].splitlines():
    key, _, value = line.partition(":")
    fields[key.strip()] = value.strip()
  return fields


def _l3() -> str:
  """The size of CPU 0's level-3 cache as sysfs gives it (e.g. "32 MiB"), or ""."""
  for index in pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
    try:
      if (index / "level").read_text().strip() == "3":
        size = (index / "size").read_text().strip()
        return f"{int(size[:-1]) // 1024} MiB" if size.endswith("K") else size
    except (OSError, ValueError):
      continue
  return ""


def describe() -> str:
  """E.g. "AMD EPYC (family 25 model 17 stepping 1), 2 logical cores, 32 MiB L3; load average at
  start 0.40 / 1.20 / 2.00 (1 / 5 / 15 min)"."""
  info = _cpuinfo()
  name = info.get("model name") or platform.processor() or platform.machine()
  ids = [f"{key} {info[field]}" for key, field in (("family", "cpu family"), ("model", "model"),
                                                   ("stepping", "stepping")) if field in info]
  cpu = f"{name} ({' '.join(ids)})" if ids else name
  parts = [cpu, f"{os.cpu_count()} logical cores"]
  if l3 := _l3():
    parts.append(f"{l3} L3")
  load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
  return ", ".join(parts) + f"; load average at start {load} (1 / 5 / 15 min)"


def print_header() -> None:
  """Prints "# machine: ..." (`describe()`), to be called when the run starts."""
  print(f"# machine: {describe()}", flush=True)


if __name__ == "__main__":
  print_header()
