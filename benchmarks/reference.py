"""The tests' PyTorch NotaGen (tests/torch_reference.py), the baseline of the model, train and
generate benchmarks. Loaded from its file: tests/ is no package, and the benchmarks run as scripts."""

import importlib.util
import pathlib
import types

REPO = pathlib.Path(__file__).resolve().parents[1]


def torch_reference() -> types.ModuleType:
  spec = importlib.util.spec_from_file_location("torch_reference",
                                                REPO / "tests" / "torch_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
