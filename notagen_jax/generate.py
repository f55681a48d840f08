"""`python -m notagen_jax.generate --checkpoint=PATH --output=DIR --period=... --composer=... ...`

Samples pieces from a checkpoint (ours, or a NotaGen `.pth` / `.safetensors`) with the original's
sampling, many at once with the KV-cached sampler, and writes per piece the raw ABC, the
un-reduced ABC, MusicXML and MIDI, plus DIR/pieces.jsonl and DIR/index.html (every piece's score,
prompt, settings, files and failures; scores need the render extra). The prompt is period /
composer / instrumentation (checked against `--known_prompts`, a prepared corpus, when given), or
a score to continue (`--continue_from=score.xml|.abc|.krn`, read as `prepare` reads it; `--tune=N`
for one tune of an ABC file of several), or both. Sampling is constrained to well-formed pieces
in the training form (`--noconstrained`: as the original); `--meter`, `--key`, `--unit`,
`--tempo` and `--voices` fix those header lines (a continued score's header must agree). The
printed summary holds the run's measures (conversion rates, bar-alignment error, the original's
filters, perplexity: docs/generation.md).
Every path may be local or a gs:// URL. Several processes (a TPU slice, SLURM, or
`--config.distributed.*` as for `train`; launch/*.sh --module=generate) each draw their share of
the pieces over their local devices, the same pieces as one process; process 0 writes the record
and the report. `--resume` keeps the pieces an interrupted run finished.
"""

import dataclasses
import json

import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from notagen_jax import checkpoint
from notagen_jax import cli
from notagen_jax import constraint
from notagen_jax import distributed
from notagen_jax import generation
from notagen_jax import report
from notagen_jax import sampling

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint dir, or NotaGen .pth.",
                                  required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where pieces are written.", required=True)
_PERIOD = flags.DEFINE_string("period", None, "e.g. Baroque, Classical, Romantic.")
_COMPOSER = flags.DEFINE_string("composer", None, "e.g. 'Bach, Johann Sebastian'.")
_INSTRUMENTATION = flags.DEFINE_string("instrumentation", None, "e.g. Keyboard, Choral.")
_KNOWN = flags.DEFINE_string("known_prompts", None,
                             "A prepared corpus whose combinations the prompt must be one of.")
_CONTINUE = flags.DEFINE_string(
    "continue_from", None, "A score to continue (MusicXML, ABC or Humdrum, read as `prepare` "
    "reads it; an interleaved ABC such as a generated piece too).")
_TUNE = flags.DEFINE_integer(
    "tune", 0, "With --continue_from an ABC file of several tunes: the one to continue (1-based). "
    "Such a file needs it (a run continues one piece; run again for another tune).", lower_bound=0)
_BARS = flags.DEFINE_integer("bars", 0, "With --continue_from: keep its first N lines (0: all).",
                             lower_bound=0)
_N = flags.DEFINE_integer("num_pieces", 4, "Pieces to generate.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 8, "Pieces generated at once.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Piece i draws from fold_in(key(seed), i).")
_TOP_K = flags.DEFINE_integer("top_k", 9, "Top-k (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Top-p.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.2, "Temperature on the kept set (0: greedy).")
_MAX_CHARS = flags.DEFINE_integer("max_chars", 102400, "Characters per piece before it fails.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 600.0, "Seconds per piece before it fails.")
_MAX_PATCHES = flags.DEFINE_integer(
    "max_patches", 0, "Patches per piece (0: until it ends); a constrained piece then finishes the "
    "line it is in.")
_CONSTRAINED = flags.DEFINE_bool(
    "constrained", True, "Admit only well-formed pieces in the training form (every voice in "
    "every line, bars aligned across voices: docs/generation.md); --noconstrained draws exactly "
    "as the original.")
# Header lines the user fixes (the model writes the rest); they need --constrained.
_HEADER = {
    "meter": flags.DEFINE_string("meter", None, "Fix the meter (M:), e.g. 3/4, C, C| or none."),
    "key": flags.DEFINE_string("key", None, "Fix the key (K:) as K: lines write it, e.g. Eb, "
                               "Amin, F#dor or none."),
    "unit": flags.DEFINE_string("unit", None, "Fix the unit note length (L:), e.g. 1/8."),
    "tempo": flags.DEFINE_string("tempo", None, "Fix the tempo (Q:), e.g. 1/4=100."),
    "voices": flags.DEFINE_integer("voices", None, "Fix the number of voices (V: lines).",
                                   lower_bound=1),
}
_FORMATS = flags.DEFINE_list("formats", ["xml", "mid"], "Outputs besides the ABC: xml, mid.")
flags.register_validator("formats", lambda formats: set(formats) <= {"xml", "mid"},
                         "takes xml, mid, both or nothing (comma-separated)")
_RESUME = flags.DEFINE_bool(
    "resume", False, "Keep the pieces already in --output (their records written) and draw the "
    "others: an interrupted run, on any number of processes, goes on.")
# The same `--config.distributed.*` flags as train and clamp_dpo (read by the launch scripts).
_CONFIG = config_flags.DEFINE_config_dict("config", ml_collections.ConfigDict({"distributed": {
    "coordinator_address": "", "num_processes": 0, "process_id": -1}}))
_PERPLEXITY = flags.DEFINE_bool(
    "perplexity", True, "Score each piece under the checkpoint's own weights (one forward pass "
    "per piece) and print the samples' perplexity in the summary.")
_WEIGHTS_DTYPE = flags.DEFINE_enum(
    "weights_dtype", "float32", list(sampling.WEIGHT_DTYPES),
    "Weight matrices as stored while sampling (sums in float32; float32 keeps the original's "
    "numbers). On a CPU: bfloat16 about 2x faster at batch 1 and above, int8 2.5-3.4x at batch 1 "
    "only.")


def main(argv):
  del argv
  settings = sampling.Settings(top_k=_TOP_K.value, top_p=_TOP_P.value,
                               temperature=_TEMPERATURE.value, max_chars=_MAX_CHARS.value,
                               max_seconds=_MAX_SECONDS.value, max_patches=_MAX_PATCHES.value,
                               constrained=_CONSTRAINED.value)
  fixed = {name: flag.value for name, flag in _HEADER.items() if flag.value is not None}
  if fixed and not settings.constrained:
    raise app.UsageError(f"{' and '.join(f'--{name}' for name in fixed)} fix header lines, "
                         "which only constrained sampling can: drop --noconstrained")
  header = constraint.Header(**fixed) if fixed else None  # a bad value raises, naming it
  fields = {"period": _PERIOD.value, "composer": _COMPOSER.value,
            "instrumentation": _INSTRUMENTATION.value}
  given = [f"--{name}" for name, value in fields.items() if value]
  missing = [f"--{name}" for name, value in fields.items() if not value]
  if given and missing:
    raise app.UsageError(f"{' and '.join(given)} given without {' and '.join(missing)}: a prompt "
                         "is all three of period, composer and instrumentation")
  if (_TUNE.value or _BARS.value) and not _CONTINUE.value:
    raise app.UsageError("--tune and --bars apply to --continue_from")
  head = ""
  if given:
    known = generation.known_combinations(_KNOWN.value) if _KNOWN.value else None
    head = generation.prompt_text(*fields.values(), known)
  if _CONTINUE.value:
    prompt = generation.continuation_prompt(_CONTINUE.value, head=head, bars=_BARS.value,
                                            tune=_TUNE.value)
  elif head:
    prompt = head
  else:
    raise app.UsageError("give --period/--composer/--instrumentation or --continue_from")
  if header:
    conflicts = generation.header_conflicts(prompt, header)
    if conflicts:
      raise app.UsageError("; ".join(
          f"--{field}={fixed[field]}: --continue_from={_CONTINUE.value} has {written}"
          for field, written in conflicts))
  distributed.initialize(_CONFIG.value)
  with cli.reported(_CHECKPOINT.value, errors=(Exception,)):
    model = checkpoint.load_model(_CHECKPOINT.value)
  weights_dtype = None if _WEIGHTS_DTYPE.value == "float32" else _WEIGHTS_DTYPE.value
  written = generation.generate(model, [prompt] * _N.value, _OUTPUT.value, settings=settings,
                                batch=_BATCH.value, seed=_SEED.value, formats=_FORMATS.value,
                                weights_dtype=weights_dtype, perplexity=_PERPLEXITY.value,
                                header=header, resume=_RESUME.value,
                                progress=distributed.is_lead())
  if not distributed.is_lead():
    return
  for item in written:
    status = "ok" if item.ok else f"FAILED ({item.reason})"
    errors = "; ".join(f"{k}: {v}" for k, v in item.errors.items())
    print(f"{item.name}: {item.chars} chars, {status}" + (f"  [{errors}]" if errors else ""))
  print(json.dumps(generation.summary(written)))
  run = {"checkpoint": _CHECKPOINT.value, "seed": _SEED.value, "batch": _BATCH.value,
         "weights_dtype": _WEIGHTS_DTYPE.value, **dataclasses.asdict(settings), **fixed}
  index = report.write_index(_OUTPUT.value, written, [prompt] * _N.value, run)
  print(f"pieces: {_OUTPUT.value}")
  print(f"report: {index}")


if __name__ == "__main__":
  cli.run(main)
