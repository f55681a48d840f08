"""`python -m notagen_jax.prepare --input=music21 --output=DIR`: scores -> prepared pieces -> shards.

Input: a folder of MusicXML / ABC / Humdrum files, or `music21` for music21's bundled corpus.
Output: DIR/pieces, DIR/interleaved, DIR/report.json, and the tokenized shards under DIR/shards.
Every path may be local or a gs:// URL (shards for gs:// are built locally, then uploaded).
With --beam_options both stages run on Apache Beam instead (docs/data_at_scale.md).
"""

from absl import app
from absl import flags

from notagen_jax import cli
from notagen_jax.data import corpus
from notagen_jax.data import preparation
from notagen_jax.data import shards

_INPUT = flags.DEFINE_string("input", corpus.MUSIC21_KEYWORD,
                             "A folder of scores, or 'music21' for its bundled corpus.")
_OUTPUT = flags.DEFINE_string("output", None, "Where prepared pieces and the report go.",
                              required=True)
_INDEX = flags.DEFINE_string("index", None,
                             "CSV/JSONL with path + period/composer/instrumentation per piece.")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.1, "Share of pieces in the eval split.",
                                    lower_bound=0, upper_bound=1)
_WORKERS = flags.DEFINE_integer("workers", 0, "Worker processes (0: all cores).", lower_bound=0)
_RETRY_FAILED = flags.DEFINE_bool("retry_failed", False, "Try recorded failures again.")
_MATCH = flags.DEFINE_string("match", "", "Only sources whose path contains this (e.g. bach/bwv).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Only the first N pieces (0: all).", lower_bound=0)
_SHARDS = flags.DEFINE_bool("shards", True, "Build the tokenized TFDS shards at the end.")
_PATCH_SIZE = flags.DEFINE_integer("patch_size", 16, "Characters per patch in the shards.",
                                    lower_bound=2)
_BEAM_OPTIONS = flags.DEFINE_string(
    "beam_options", "",
    "Prepare and shard on Apache Beam with these pipeline options, e.g. '--runner=DirectRunner' "
    "or '--runner=DataflowRunner --project=P ...' (needs the beam extra); empty: local processes.")


def main(argv):
  del argv
  beam_options = None
  if _BEAM_OPTIONS.value:
    try:
      # Imported only here: Beam is an optional extra.
      from notagen_jax.data import beam  # pylint: disable=import-outside-toplevel
    except ImportError as error:
      raise app.UsageError(f"--beam_options needs Apache Beam (pip install -e '.[beam]'): "
                           f"{error}") from error
    beam_options = beam.options(_BEAM_OPTIONS.value)
    try:
      beam.check_reachable(beam_options, _INPUT.value, _OUTPUT.value)
    except ValueError as error:
      raise app.UsageError(str(error)) from error
  if _INPUT.value == corpus.MUSIC21_KEYWORD:
    if _INDEX.value:
      raise app.UsageError("--index applies to a folder input, not to music21's corpus")
    sources = list(corpus.music21_sources())
  else:
    sources = list(corpus.folder_sources(_INPUT.value, _INDEX.value))
  if not sources:
    raise app.UsageError(f"{_INPUT.value}: no scores in it (files ending in "
                         f"{', '.join(corpus.SUPPORTED_SUFFIXES)})")
  if _MATCH.value:
    matched = [source for source in sources if _MATCH.value in source.path]
    if not matched:
      raise app.UsageError(f"--match={_MATCH.value}: none of the {len(sources)} scores in "
                           f"{_INPUT.value} has it in its path")
    sources = matched
  options = preparation.PrepareOptions(eval_fraction=_EVAL_FRACTION.value,
                                       workers=_WORKERS.value,
                                       retry_failed=_RETRY_FAILED.value, limit=_LIMIT.value,
                                       beam_options=beam_options)
  report = preparation.prepare_corpus(sources, _OUTPUT.value, options)
  print(preparation.summary(report))
  print(f"report: {_OUTPUT.value}/report.json")
  if not report["prepared"]:
    raise app.UsageError(f"none of the {report['requested']} pieces could be prepared (reasons "
                         f"in {_OUTPUT.value}/report.json)")
  if _SHARDS.value:
    shards_dir = shards.build_shards(_OUTPUT.value, f"{_OUTPUT.value}/shards",
                                     patch_size=_PATCH_SIZE.value, beam_options=beam_options)
    print(f"shards: {shards_dir}")


if __name__ == "__main__":
  cli.run(main)
