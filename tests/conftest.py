"""Test-wide setup: 8 simulated CPU devices for sharding tests, the golden data, a real corpus and a
headless browser."""

import atexit
import os
import pathlib
import shutil
import tempfile

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole run: the xdist workers and the entry points the tests
# start inherit it from the first process, so a program compiled once (the constrained sampler
# above all, a minute each) is read back by every other test that lowers the same program.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="notagen-jax-xla-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import pytest  # noqa: E402

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  """The original NotaGen's outputs that the parity tests compare against (golden/README.md)."""
  return GOLDEN


@pytest.fixture(scope="session")
def corpus_shards(tmp_path_factory):
  """Tiny real shards: a dozen Bach chorales from music21's corpus, prepared and tokenized."""
  from notagen_jax.data import corpus, preparation, shards  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("corpus")
  sources = [s for s in corpus.music21_sources()
             if s.path.endswith(".mxl") and "/bach/bwv" in s.path][:12]
  preparation.prepare_corpus(sources, root / "prepared",
                             preparation.PrepareOptions(eval_fraction=0.25, workers=1))
  return shards.build_shards(root / "prepared", root / "shards")


@pytest.fixture(scope="session")
def cuda_plugin() -> pathlib.Path:
  """JAX's CUDA plugin without the CUDA libraries, in a folder of its own that .ci/run installs
  (beside jax, every JAX process of the tests would try it for a GPU): the GPU compiles put it on
  their PYTHONPATH."""
  folder = GOLDEN.parents[1] / "build" / "jax-cuda-plugin"
  if not folder.is_dir():
    message = f"JAX's CUDA plugin is not in {folder} (.ci/run installs it there)"
    if os.environ.get("CI"):
      pytest.fail(message)
    pytest.skip(message)
  return folder


@pytest.fixture(scope="module")
def browser():
  """Debian's Chromium, headless, through its chromedriver (the page tests)."""
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  options = webdriver.ChromeOptions()
  for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                   "--window-size=1280,2400"):
    options.add_argument(argument)
  driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
  yield driver
  driver.quit()
