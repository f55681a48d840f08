"""The CLaMP-DPO loop: `--config=configs/clamp_dpo.py:SIZE` (SIZE as the policy; or `quickstart`).

The original's recipe: 1000 pieces per iteration (top-k 9, top-p 0.9, temperature 1.2), scored
with CLaMP 2 against the ground-truth pieces of the prompt, best 10% that pass the filters chosen,
worst 10% rejected, every chosen x rejected pair, DPO-Positive (configs/dpo.py) from the current
policy. `quickstart` is the embedded default: a tiny policy, the weight-free symbolic scorer, 192
pieces and a short DPO (200 pairs) with a larger learning rate, finishing in minutes on a CPU.
"""

import ml_collections

from configs import dpo


def get_config(arg: str = "small"):
  quick = arg == "quickstart"
  size = "tiny" if quick else arg
  c = ml_collections.ConfigDict()
  c.workdir = ""
  c.init_checkpoint = ""  # the first policy: ours or an original NotaGen .pth
  c.iterations = 2
  c.prompt = ("Baroque", "Bach, Johann Sebastian", "Choral")  # period, composer, instrumentation
  # The paper's prompts instead: every combination of ground_truth.prepared_dir (112 in its
  # fine-tuning corpus), sample.num_pieces pieces each, each scored against its own ground truth.
  c.prompts_from_corpus = False

  c.ground_truth = ml_collections.ConfigDict()
  c.ground_truth.prepared_dir = ""  # a `prepare` output
  c.ground_truth.match_prompt = True  # only its pieces with the same prompt

  c.sample = ml_collections.ConfigDict()
  c.sample.num_pieces = 192 if quick else 1000  # per prompt
  c.sample.batch = 16 if quick else 32
  c.sample.top_k = 9
  c.sample.top_p = 0.9
  c.sample.temperature = 1.0 if quick else 1.2
  c.sample.max_chars = 6000 if quick else 102400
  c.sample.max_seconds = 600.0
  c.sample.max_patches = 0
  # Admit only well-formed pieces (notagen_jax/constraint.py): every sample un-reduces with its
  # voices' bars aligned, so none is lost to the filters for its form. False: as the original.
  c.sample.constrained = True
  c.sample.seed = 0

  c.scorer = ml_collections.ConfigDict()
  c.scorer.kind = "symbolic" if quick else "clamp2"
  c.scorer.checkpoint = ""  # CLaMP 2 weights (.pth with music_model.* / music_proj.*)
  c.scorer.workers = 2 if quick else 8  # symbolic: parsing processes
  # The plagiarism filter's bound; the symbolic features of two real chorales can be 0.96 alike,
  # so with them only near-copies (>= 0.995) count.
  c.scorer.max_similarity = 0.995 if quick else 0.95

  c.select = ml_collections.ConfigDict()
  c.select.fraction = 0.1
  # Score pieces that cannot be un-reduced as generated, so they can be rejected (never chosen);
  # the original's sampler retries them away instead, which a barely trained model cannot afford.
  c.select.score_malformed = quick
  # The original's chosen-set filters, the quickstart's too: constrained sampling aligns the bars
  # of every voice, which a few minutes of training alone do not teach a tiny model.
  c.select.filters = ("aligned", "grouped", "original")

  # Several processes (TPU slice, SLURM, launch/local.sh --num_processes=N): train's flags, read
  # once by `clamp_dpo` for every stage (c.train.distributed is not read).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # empty: auto-detect (TPU pod, SLURM) or single process
  c.distributed.num_processes = 0
  c.distributed.process_id = -1

  c.train = dpo.get_config(size)
  if quick:
    c.train.optimizer.learning_rate = 2e-5
    c.train.train.num_steps = 200
    c.train.train.log_every = 25
    c.train.train.eval_every = 1000
    c.train.train.checkpoint_every = 1000
    c.train.data.num_threads = 0
  return c
