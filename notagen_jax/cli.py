"""What every entry point shares: a user's mistake ends the run in one line, and quiet libraries.

`run(main)` runs an absl main, `run_argparse(main)` one that parses its own arguments. A mistake
(an unknown flag or config field, a bad value, a config file that fails to load, a missing or
unreadable file) ends the run with exit status 1 and one line on stderr, `VERB: message`: flag
errors, and `app.UsageError`, `ValueError` or `OSError` raised by main. Any other exception is a
bug and keeps its traceback; `--verbosity=1` logs the traceback of a reported mistake too.

Without `--verbosity`, INFO logs come from this package only (training metrics, say): orbax,
tensorflow_datasets, jax and other libraries log warnings and errors, and TFDS draws no progress
bars, so that ours stay readable. `--verbosity=0` shows every library's INFO logs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging as py_logging
import os
import sys
from typing import Any, Callable, Iterator, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
USER_ERRORS = (app.UsageError, ValueError, OSError)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def verb() -> str:
  """The entry point's name (`python -m notagen_jax.prepare` -> prepare)."""
  return os.path.splitext(os.path.basename(sys.argv[0]))[0]


def fail(message: Any) -> NoReturn:
  """Ends the run: `VERB: message` on one line of stderr, exit status 1."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  sys.exit(f"{verb()}: {'; '.join(lines)}")


@contextlib.contextmanager
def reported(path: str = "",
             errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Iterator[None]:
  """`errors` raised inside end the run in one line, naming `path` (the file read) if they don't."""
  try:
    yield
  except errors as error:
    logging.debug("traceback of the error below", exc_info=True)
    message = str(error)
    if not message or not isinstance(error, USER_ERRORS):  # then its type says what went wrong
      message = f"{type(error).__name__}: {message}".removesuffix(": ")
    if path and path not in message and os.path.abspath(path) not in message:
      message = f"{path}: {message}"
    fail(message)


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with one-line mistakes and quiet libraries (see the module doc)."""
  app.run(functools.partial(_run_main, main), flags_parser=_parse_flags)


def run_argparse(main: Callable[[list[str]], Any]) -> None:
  """Runs `main(args)` of an argparse entry point, as `run` does; `--verbosity` is taken out of
  the arguments first (argparse reports its own errors, also in one last line)."""
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  parser.add_argument("--verbosity", "-v", type=int)
  known, args = parser.parse_known_args(sys.argv[1:])
  FLAGS([sys.argv[0]] + ([] if known.verbosity is None else [f"--verbosity={known.verbosity}"]))
  _quiet_libraries()
  with reported():
    sys.exit(main(args))


def _run_main(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  _quiet_libraries()
  with reported():
    return main(argv)


def _quiet_libraries() -> None:
  if FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.INFO)
  # absl's handler sits on the root logger, so this sees the records of every library.
  logging.get_absl_handler().addFilter(_ours_or_warning)
  if "tensorflow_datasets" in sys.modules:  # only when an entry point uses it: its import is slow
    sys.modules["tensorflow_datasets"].display_progress_bar(False)


def _ours_or_warning(record: py_logging.LogRecord) -> bool:
  return record.levelno >= py_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, each error in one line, and config files checked to have loaded."""
  try:
    rest = FLAGS(argv)
  except flags.Error as error:
    fail(_flag_message(str(error)))
  except (AttributeError, KeyError) as error:  # ml_collections: a field the config lacks
    fail(_unknown_field(argv, error))
  except OSError as error:  # ml_collections: overrides of a config file that did not load
    fail(_not_loaded(argv, error))
  for name in list(FLAGS):
    flag = FLAGS[name]
    if name == flag.name and flag.value is not None and _is_config_file(flag):
      try:
        getattr(flag.value, "keys")  # a config file that did not load raises only when read
      except OSError as error:
        fail(_not_loaded(argv, error))
  return rest


def _flag_message(message: str) -> str:
  """absl's message; a config file's traceback is cut to its last line, the error itself."""
  message = message.removeprefix("flag ")
  lines = [line for line in message.splitlines() if line.strip()]
  if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
    head = lines[0].removesuffix(" Error whilst parsing config file:")
    return f"{head} {lines[-1].strip()}"
  return message


def _unknown_field(argv: Sequence[str], error: Exception) -> str:
  field = str(error).strip("\"'")
  for arg in argv:
    name = arg.lstrip("-").split("=")[0]
    if arg.startswith("--") and field in name.split(".")[1:]:
      config, _, path = name.partition(".")
      return f"{arg}: the {config} has no field {path!r}"
  return f"no config field {field!r}"


def _is_config_file(flag: flags.Flag) -> bool:
  try:
    config_flags.get_config_filename(flag)
  except TypeError:  # not a config flag
    return False
  except flags.Error:  # a config flag not parsed yet
    pass
  return True


def _not_loaded(argv: Sequence[str], error: OSError) -> str:
  """Which config file did not load, and why."""
  for arg in argv:
    name, _, value = arg.removeprefix("--").partition("=")
    if arg.startswith("--") and name in FLAGS and _is_config_file(FLAGS[name]):
      if not os.path.exists(value.split(":")[0]):
        return f"{arg}: no such file"
      return f"{arg}: {str(error).splitlines()[-1].strip()}"
  return str(error)
