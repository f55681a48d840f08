"""`python -m notagen_jax.demo --checkpoint=PATH --known_prompts=PREPARED [--port=7860]`

NotaGen's demo on JAX: a local page (http://127.0.0.1:7860 by default, this machine only) whose
prompt menus offer the period / composer / instrumentation combinations of a prepared corpus,
optionally continuing an uploaded score, with the meter and key optionally fixed; it samples
constrained to well-formed pieces (as `generate` does by default) and shows the generation's log,
the engraved piece with a player, and links to its ABC, MusicXML and MIDI (all written under
--output).
"""

from absl import flags

from notagen_jax import checkpoint
from notagen_jax import cli
from notagen_jax import demo_app
from notagen_jax import generation
from notagen_jax import sampling

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint dir, or NotaGen .pth.",
                                  required=True)
_KNOWN = flags.DEFINE_string("known_prompts", None,
                             "A prepared corpus: its combinations are the prompts offered.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", "runs/demo", "Where each job's files are written.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (0.0.0.0: every network).")
_PORT = flags.DEFINE_integer("port", 7860, "Port to serve on.")
_WEIGHTS_DTYPE = flags.DEFINE_enum("weights_dtype", "float32", list(sampling.WEIGHT_DTYPES),
                                   "Weight matrices as stored while sampling (see generate).")


def main(argv):
  del argv
  with cli.reported(_CHECKPOINT.value, errors=(Exception,)):
    model = checkpoint.load_model(_CHECKPOINT.value)
  weights_dtype = None if _WEIGHTS_DTYPE.value == "float32" else _WEIGHTS_DTYPE.value
  demo = demo_app.Demo(model, _OUTPUT.value, generation.known_combinations(_KNOWN.value),
                       weights_dtype)
  server = demo_app.server(demo, _HOST.value, _PORT.value)
  print(f"demo: http://{_HOST.value}:{server.server_port}/", flush=True)
  server.serve_forever()


if __name__ == "__main__":
  cli.run(main)
