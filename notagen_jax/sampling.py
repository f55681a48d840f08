"""Sampling: the original's filters and a KV-cached, batched sampler with the original's semantics.

Per character: keep the top k, renormalize; keep the smallest set whose cumulative probability
exceeds p (the crossing token included), renormalize; raise the kept probabilities to 1/T and
renormalize; draw. A patch is 16 characters; what follows its first eos becomes pad; a patch
starting bos, eos ends the piece. The first body patch, once it starts with `[r:`, is drawn again
after forcing `[r:0/`. A full context keeps the metadata and the last half of the body lines.

Where the original re-runs both decoders for every character, one piece at a time, this keeps a
KV cache in the patch-level decoder across patches and one in the character-level decoder within a
patch, draws whole patches inside one compiled loop, and runs many pieces at once: every row has
its own RNG stream (a piece's draws depend on its seed and index only), its own context length and
stop state, and a finished row takes the next waiting piece (continuous batching). Prompts waiting
for rows are encoded together, and the weights can be read in bfloat16 (`Sampler`'s dtype).
The rows are spread over the process's local devices, each drawing its own rows with its own copy
of the weights (no communication): a piece's draws do not depend on the device it runs on.

With `Settings(constrained=True)` each character is drawn among those `constraint` admits, so
that every piece is well-formed (and the first body patch needs no forcing).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Callable, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from notagen_jax import constraint
from notagen_jax import model as model_lib
from notagen_jax.data import tokenizer
from notagen_jax.inference import layout
from notagen_jax.inference import weights

BODY_MARKER = "[r:"
FIRST_BODY_PREFIX = "[r:0/"
# Row events returned per generated patch (DEAD: the constraint admits no next character).
IDLE, APPENDED, ENDED, FULL, DEAD = 0, 1, 2, 3, 4
# Context patches prefilled in one call at most (rows x length bucket).
PREFILL_PATCHES = 4096
# The mesh axis a Sampler spreads its batch rows over (one device's rows are contiguous).
ROWS = "rows"


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sampling hyper-parameters (the original's CLaMP-DPO values by default) and guards."""
  top_k: int = 9
  top_p: float = 0.9
  temperature: float = 1.2
  max_chars: int = 102400
  max_seconds: float = 600.0
  # Patches drawn per piece before it is stopped (0: no limit); stopped pieces count as complete.
  # A constrained piece goes on to the end of a line it may end with (its first body line while it
  # has none), so that all of it stays well-formed.
  max_patches: int = 0
  # The original drops the prompt lines when the context overflows (only generated metadata is
  # kept); keeping them keeps the conditioning. False reproduces the original exactly.
  keep_prompt_on_overflow: bool = True
  # Admit only well-formed pieces (`constraint`): masks each character's distribution before the
  # top-k / top-p / temperature steps. False draws exactly as the original.
  constrained: bool = False

  def __post_init__(self):
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.temperature < 0.0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")


def filter_probs(probs: jax.Array, top_k: int, top_p: float, temperature: float) -> jax.Array:
  """The distribution a character is drawn from: top-k, then top-p, then temperature. [..., V]."""
  sorted_probs, order = jax.lax.top_k(probs, probs.shape[-1])
  kept = _filter_sorted(sorted_probs, top_k, top_p, temperature)
  return jnp.take_along_axis(kept, jnp.argsort(order, axis=-1), axis=-1)


def _normalize(p: jax.Array) -> jax.Array:
  return p / p.sum(-1, keepdims=True)


def _filter_sorted(sorted_probs: jax.Array, top_k: int, top_p: float,
                   temperature: float) -> jax.Array:
  """`filter_probs` on probabilities sorted in decreasing order."""
  rank = jnp.arange(sorted_probs.shape[-1])
  p = sorted_probs
  if top_k:
    p = _normalize(jnp.where(rank < top_k, p, 0.0))
  if top_p < 1.0:
    before = jnp.concatenate([jnp.zeros_like(p[..., :1]), jnp.cumsum(p, axis=-1)[..., :-1]], -1)
    p = _normalize(jnp.where((rank == 0) | (before <= top_p), p, 0.0))
  if temperature == 0.0:
    return (rank == 0).astype(p.dtype) * jnp.ones_like(p)
  return _normalize(p ** (1.0 / temperature))


def draw(keys: jax.Array, probs: jax.Array, settings: Settings) -> jax.Array:
  """One character per row of probs [B, V], row b drawn with keys[b]."""
  # Only the top k can be drawn, so sorting and drawing among them alone is the same distribution
  # (and most of the cost of a step at large batch went to the full sort and draw).
  vocab = probs.shape[-1]
  sorted_probs, order = jax.lax.top_k(probs, min(settings.top_k or vocab, vocab))
  kept = _filter_sorted(sorted_probs, settings.top_k, settings.top_p, settings.temperature)
  index = jax.vmap(jax.random.categorical)(keys, jnp.log(kept))
  return jnp.take_along_axis(order, index[:, None], axis=-1)[:, 0]


@flax.struct.dataclass
class DecodeState:
  """The device-side state of every row of a batch."""
  cache: list[model_lib.KVCache]  # patch-level keys / values, [B, N, capacity, D] per layer
  hidden: jax.Array  # [B, H] patch-level output at the last context patch
  length: jax.Array  # [B] patches in the context
  prefix: jax.Array  # [B, P] chars of the next patch already given (an open last bar)
  prefix_len: jax.Array  # [B]
  in_body: jax.Array  # [B] the tune body has started (the original's tunebody_flag)
  active: jax.Array  # [B]
  # [B, 2] one RNG key per piece, as its raw data: a typed key array returned by a call over
  # several devices makes the next call miss jit's fast-path cache.
  keys: jax.Array
  step: jax.Array  # [B] patches drawn so far for the piece, folded into its key
  grammar: constraint.State  # [B] where each piece stands in the constrained grammar


def empty_state(cfg: model_lib.ModelConfig, batch: int, capacity: int,
                cache_type: type[model_lib.KVCache]) -> DecodeState:
  p = cfg.patch_size
  return DecodeState(
      cache=[cache_type.empty(cfg, batch, capacity) for _ in range(cfg.patch_layers)],
      hidden=jnp.zeros((batch, cfg.hidden), cfg.dtype),
      length=jnp.zeros((batch,), jnp.int32), prefix=jnp.zeros((batch, p), jnp.int32),
      prefix_len=jnp.zeros((batch,), jnp.int32), in_body=jnp.zeros((batch,), bool),
      active=jnp.zeros((batch,), bool),
      keys=jax.random.key_data(jax.random.split(jax.random.key(0), batch)),
      step=jnp.zeros((batch,), jnp.int32),
      grammar=constraint.batch([constraint.initial()] * batch))


def _draw_patch(model: model_lib.NotaGen, hidden: jax.Array, prefix: jax.Array,
                prefix_len: jax.Array, keys: jax.Array, settings: Settings,
                cache_type: type[model_lib.KVCache], grammar: constraint.State,
                header: constraint.Fixed) -> tuple[jax.Array, constraint.State]:
  """[B, P] chars of the next patch: the prefix, then drawn chars, one cached char step each.

  Constrained, each drawn char is drawn among those the grammar admits and moves the grammar on
  (the prefix is already in it); a row whose grammar admits nothing is marked dead.
  """
  cfg = model.cfg
  b, p = prefix.shape
  cache = [cache_type.empty(cfg, b, p) for _ in range(cfg.char_layers)]

  def step(t, carry):
    cache, chars, previous, grammar, closed = carry
    position = jnp.full((b, 1), t)
    x = model.char.embed(hidden[:, None], previous[:, None], position)
    logprobs, cache = model.char.decode(x, cache, position[:, 0])
    char_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, t)
    probs = jnp.exp(logprobs[:, 0])
    drawing = t >= prefix_len
    if settings.constrained:
      # Only the mask of every candidate is kept (XLA drops their next states); the drawn char's
      # next state is computed once below.
      _, admitted = constraint.admissible(grammar, t, header)
      live = drawing & ~closed & ~grammar.dead
      stuck = live & ~admitted.any(-1)
      allowed = jnp.where((live & ~stuck)[:, None], admitted, True)
      masked = jnp.where(allowed, probs, 0.0)
      total = masked.sum(-1, keepdims=True)
      # An admitted char keeps a chance even where the model gives every admitted char none.
      probs = jnp.where(total > 0, masked / jnp.where(total > 0, total, 1.0),
                        allowed / allowed.sum(-1, keepdims=True))
    drawn = draw(char_keys, probs, settings)
    char = jnp.where(drawing, drawn, prefix[:, t]).astype(jnp.int32)
    if settings.constrained:
      moved, _ = jax.vmap(constraint.step, (0, 0, None, None))(grammar, drawn, t, header)
      grammar = jax.tree.map(lambda new, old: jnp.where(live & ~stuck, new, old), moved, grammar)
      grammar = grammar.replace(dead=grammar.dead | stuck)
      closed = closed | (char == tokenizer.EOS)
    return cache, chars.at[:, t].set(char), char, grammar, closed

  init = (cache, jnp.zeros((b, p), jnp.int32), jnp.zeros((b,), jnp.int32), grammar,
          jnp.zeros((b,), bool))
  _, chars, _, grammar, _ = jax.lax.fori_loop(0, p, step, init)
  return chars, grammar


def _pad_after_eos(chars: jax.Array) -> jax.Array:
  seen = jnp.cumsum(chars == tokenizer.EOS, axis=-1) - (chars == tokenizer.EOS)
  return jnp.where(seen > 0, tokenizer.PAD, chars)


def _starts_with(chars: jax.Array, start: jax.Array, text: str) -> jax.Array:
  """Whether chars[b, start[b]:] begins with text."""
  index = (start[:, None] + jnp.arange(len(text))).clip(0, chars.shape[1] - 1)
  picked = jnp.take_along_axis(chars, index, axis=1)
  fits = start + len(text) <= chars.shape[1]
  return fits & jnp.all(picked == jnp.array([ord(c) for c in text]), axis=1)


def _next_patch(model: model_lib.NotaGen, state: DecodeState, settings: Settings,
                header: constraint.Fixed) -> tuple[DecodeState, tuple[jax.Array, jax.Array,
                                                                      jax.Array]]:
  """Every active row draws one patch: (state, (patch [B, P], event [B], text_from [B]))."""
  cfg = model.cfg
  p = cfg.patch_size
  keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(state.keys), state.step)
  cache_type = type(state.cache[0])
  chars, grammar = _draw_patch(model, state.hidden, state.prefix, state.prefix_len, keys,
                               settings, cache_type, state.grammar, header)
  grammar = jax.tree.map(lambda new, old: jnp.where(state.active, new, old), grammar,
                         state.grammar)
  # Chars given as a prefix are already in the piece's text; the forced `[r:0/` is not.
  text_from = state.prefix_len
  if settings.constrained:
    redo = jnp.zeros_like(state.active)  # the grammar starts the body with `[r:0/` already
  else:
    redo = state.active & ~state.in_body & _starts_with(chars, state.prefix_len, BODY_MARKER)

    def regenerate(chars):
      forced = jnp.array([ord(c) for c in FIRST_BODY_PREFIX] +
                         [0] * (p - len(FIRST_BODY_PREFIX)))
      redo_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, p)
      again, _ = _draw_patch(model, state.hidden, jnp.broadcast_to(forced, chars.shape),
                             jnp.full_like(state.prefix_len, len(FIRST_BODY_PREFIX)),
                             redo_keys, settings, cache_type, state.grammar, header)
      return jnp.where(redo[:, None], again, chars)

    chars = jax.lax.cond(jnp.any(redo), regenerate, lambda c: c, chars)
    text_from = jnp.where(redo, 0, text_from)
  chars = _pad_after_eos(chars)
  ended = _starts_with(chars, text_from, chr(tokenizer.BOS) + chr(tokenizer.EOS))
  full = state.length + 1 >= cfg.patch_length
  event = jnp.where(~state.active, IDLE, jnp.where(ended, ENDED, jnp.where(full, FULL, APPENDED)))
  # Strongly typed: a weakly typed `active` fed back would compile the next call again.
  event = jnp.where(state.active & grammar.dead, DEAD, event).astype(jnp.int32)
  feed = event == APPENDED
  hidden, cache = model.patch.decode(chars[:, None], state.cache, state.length)
  state = state.replace(
      cache=cache,
      hidden=jnp.where(feed[:, None], hidden[:, 0], state.hidden),
      length=state.length + feed,
      prefix_len=jnp.where(state.active, 0, state.prefix_len),
      in_body=state.in_body | redo,
      active=feed,
      step=state.step + state.active,
      grammar=grammar)
  return state, (chars, event, text_from)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 6), donate_argnums=2)
def _generate(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, settings: Settings,
              n_patches: int, header: constraint.Fixed, mesh: jax.sharding.Mesh
              ) -> tuple[DecodeState, tuple[jax.Array, jax.Array, jax.Array]]:
  """n_patches patches for every row: patches [n, B, P], events [n, B], text_from [n, B].

  Each device of `mesh` draws its own rows (shard_map: the CPU kernels' custom calls stay on
  the rows they are given, where a partitioner would gather them).
  """
  def local(params, state, header):
    model = nnx.merge(graphdef, params)
    return jax.lax.scan(lambda s, _: _next_patch(model, s, settings, header), state, None,
                        n_patches)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(ROWS), P()),
                       out_specs=(P(ROWS), P(None, ROWS)), check_vma=False)(params, state, header)


@flax.struct.dataclass
class Load:
  """Contexts to load into rows of a DecodeState: K rows from U distinct contexts per device.

  Every field has a leading device axis; rows are numbered within the device's rows. Entries past
  `count` are padding, and so are contexts no row takes.
  """
  patches: jax.Array  # [D, U, T, P], the first n_patches real
  n_patches: jax.Array  # [D, U]
  row: jax.Array  # [K]
  context: jax.Array  # [K] index into patches
  prefix: jax.Array  # [K, P]
  prefix_len: jax.Array  # [K]
  in_body: jax.Array  # [K]
  key: jax.Array  # [K, 2] raw key data, as DecodeState.keys (each [K...] field is [D, K...])
  step: jax.Array  # [K]
  grammar: constraint.State  # [K]
  count: jax.Array  # [D] real rows


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=2)
def _prefill(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, load: Load,
             mesh: jax.sharding.Mesh) -> DecodeState:
  """Each device runs the patch decoder over its contexts of `load` and puts them in its rows."""
  return jax.shard_map(functools.partial(_prefill_local, graphdef), mesh=mesh,
                       in_specs=(P(), P(ROWS), P(ROWS)), out_specs=P(ROWS),
                       check_vma=False)(params, state, load)


def _prefill_local(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState,
                   load: Load) -> DecodeState:
  load = jax.tree.map(lambda a: a[0], load)  # this device's part
  model = nnx.merge(graphdef, params)
  cfg = model.cfg
  u, t = load.patches.shape[:2]
  caches = [type(state.cache[0]).empty(cfg, u, t) for _ in range(cfg.patch_layers)]
  hidden, caches = model.patch.decode(load.patches, caches, jnp.zeros((u,), jnp.int32))
  last = hidden[jnp.arange(u), load.n_patches - 1]

  def load_row(i, state):
    # One row at a time: a dynamic_update_slice of a donated buffer is done in place.
    row, context = load.row[i], load.context[i]
    put = lambda full, part: jax.lax.dynamic_update_slice(
        full, part[context][None].astype(full.dtype), (row, 0, 0, 0))
    set_row = lambda full, part: full.at[row].set(part[i])
    return state.replace(
        cache=[c.replace(k=put(c.k, r.k), v=put(c.v, r.v)) for c, r in zip(state.cache, caches)],
        hidden=state.hidden.at[row].set(last[context]),
        length=state.length.at[row].set(load.n_patches[context]),
        prefix=set_row(state.prefix, load.prefix),
        prefix_len=set_row(state.prefix_len, load.prefix_len),
        in_body=set_row(state.in_body, load.in_body), active=state.active.at[row].set(True),
        keys=set_row(state.keys, load.key), step=set_row(state.step, load.step),
        grammar=jax.tree.map(set_row, state.grammar, load.grammar))

  return jax.lax.fori_loop(0, load.count, load_row, state)


@dataclasses.dataclass
class Piece:
  """One piece being generated, with the original's bookkeeping of its text."""
  index: int
  prompt: str
  in_body: bool
  start_time: float
  # What an overflowing context keeps of the prompt: all of a metadata-only prompt (with
  # `keep_prompt_on_overflow`); the metadata of a prompt whose body started, its body going to `body`.
  prompt_head: str = ""
  text: list[str] = dataclasses.field(default_factory=list)  # generated text, patch by patch
  metadata: list[str] = dataclasses.field(default_factory=list)  # generated before the body
  body: list[str] = dataclasses.field(default_factory=list)  # the body in the current context
  patches: int = 0
  overflows: int = 0

  @property
  def chars(self) -> int:
    return len(self.prompt) + sum(map(len, self.text))

  @property
  def at_body_line_end(self) -> bool:
    """The last patch ended a body line that a piece may end with (a patch holds one line's
    characters at most)."""
    if not (self.in_body and self.text and self.text[-1].endswith("\n")):
      return False
    # The line's last character is in its last patch or, when that holds only the `\n`, the one
    # before (a body line's first patch starts with `[r:`).
    tail = "".join(self.text[-2:])
    return not _ends_in_volta(tail[tail.rfind("\n", 0, len(tail) - 1) + 1:])

  def append(self, text: str):
    """A generated patch's text; the body starts with the first patch that starts `[r:`."""
    self.patches += 1
    self.in_body = self.in_body or text.startswith(BODY_MARKER)
    self.text.append(text)
    (self.body if self.in_body else self.metadata).append(text)


def _ends_in_volta(text: str) -> bool:
  """A body line ending with a volta number (after its last barline: no bar ends on a digit)."""
  return text.rstrip("\n")[-1:].isdigit()


def whole_lines(text: str) -> str:
  """A constrained piece cut where it may stop: after its last complete line, without trailing
  lines that end with a volta number (abctoolkit cannot split a voice that opens with a barline
  and ends with one, and no ending is left half written)."""
  lines = text[:text.rfind("\n") + 1].splitlines(keepends=True)
  while lines and lines[-1].startswith(BODY_MARKER) and _ends_in_volta(lines[-1]):
    lines.pop()
  return "".join(lines)


@dataclasses.dataclass(frozen=True)
class Result:
  """A finished piece. `text` is the prompt plus the raw generated ABC (reduced, stream markers).

  `ok` is False when a guard stopped it (characters, time, a context that cannot be cut).
  """
  index: int
  prompt: str
  text: str
  ok: bool
  reason: str
  patches: int
  overflows: int
  seconds: float


def split_prompt(patchilizer: tokenizer.Patchilizer,
                 text: str) -> tuple[np.ndarray, np.ndarray, bool]:
  """A prompt's full patches [n, P], the chars of its open last patch, and whether a body started."""
  in_body = any(line.startswith(("[r:", "[V:")) for line in text.split("\n"))
  if in_body:
    ids = patchilizer.encode_generate(text)
  else:
    # A metadata prompt is encoded as the original's inference does (encode_generate would read
    # a text without body lines as both metadata and body).
    ids = patchilizer.to_ids([patchilizer.bos_patch] + [
        patch for line in tokenizer.text_lines(text)
        for patch in tokenizer.chunk(line, patchilizer.patch_size)])
  prefix: list[int] = []
  if len(ids[-1]) < patchilizer.patch_size:
    prefix = ids.pop()
  full = np.asarray(ids, np.int32).reshape(-1, patchilizer.patch_size)
  return full, np.asarray(prefix, np.int32), in_body


def overflow_context(piece: Piece) -> str | None:
  """The text re-encoded when the context is full, as the original; None where it gives up.

  Generated metadata plus the last half (rounded down) of the body lines, the last left open.
  """
  body = "".join(piece.body)
  if "\n" not in body:
    return None
  lines = body.strip().split("\n")
  if body.endswith("\n"):
    lines = [line + "\n" for line in lines]
  else:
    lines = [line + "\n" for line in lines[:-1]] + lines[-1:]
  kept = "".join(lines[-(len(lines) // 2):])
  piece.body = [kept]
  return piece.prompt_head + "".join(piece.metadata) + kept


def _bucket(n: int, cap: int, minimum: int = 8) -> int:
  """Next power of two >= n (at least `minimum`, at most `cap`): few compiled shapes."""
  return min(cap, max(minimum, 1 << (max(n, 1) - 1).bit_length()))


def _grow(state: DecodeState, capacity: int) -> DecodeState:
  pad = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, capacity - a.shape[2]), (0, 0)])
  return state.replace(cache=[c.replace(k=pad(c.k), v=pad(c.v)) for c in state.cache])


WEIGHT_DTYPES = weights.DTYPES  # what a Sampler's dtype may be


def as_stored(model: model_lib.NotaGen, dtype: str) -> model_lib.NotaGen:
  """The model with its weights rounded as a Sampler with `dtype` stores them, held in the
  model's dtype: the distribution that sampling with those weights draws from, for any forward."""
  graphdef, params = nnx.split(model)
  return nnx.merge(graphdef, weights.as_parameters(weights.store(params, dtype), params))


class Sampler:
  """Generates pieces from prompt texts, `batch` rows at a time, with the cached decoders.

  Each compiled call draws `patches_per_call` patches for every row; between calls the host reads
  the new patches, finishes pieces, refills free rows and re-encodes full contexts.

  `dtype` is how the weight matrices are stored for sampling, converted once here (None: as
  stored): one of WEIGHT_DTYPES, for the blocks' matrices (98% of the bytes; see
  `inference.layout`). Every character reads all of the char decoder's weights, so "bfloat16"
  halves the bytes moved and "int8" nearly quarters them; activations and sums stay in the
  model's dtype.
  bfloat16 rounds each weight to 8 significant bits, int8 to 1/254 of its block's largest: both
  change the distributions slightly (float32 keeps the original's numbers). On a CPU a few rows
  take `cpu_kernels`' kernels (bfloat16 ~1.5x and int8 ~3x float32's speed at batch 1, see
  benchmarks/generate_throughput.py); larger batches take XLA's dot, where bfloat16 pays and int8
  is dequantized at every step: use it for batch 1 only. float32 matrices are kept in
  `cpu_kernels`' column blocks on a CPU, whose kernel is faster at every batch.

  The rows are spread over `devices` (default: the process's local devices), as many of them as
  divide `batch`, each holding the weights and `batch / n` rows.
  """

  def __init__(self, model: model_lib.NotaGen, settings: Settings = Settings(), batch: int = 8,
               patches_per_call: int = 8, dtype: str | None = None,
               devices: Sequence[jax.Device] | None = None):
    self.cfg = model.cfg
    self.settings = settings
    self.batch = batch
    self.patches_per_call = patches_per_call
    devices = list(jax.local_devices() if devices is None else devices)
    n = max(d for d in range(1, min(len(devices), batch) + 1) if batch % d == 0)
    self.mesh = jax.sharding.Mesh(np.array(devices[:n]), (ROWS,))
    self.rows_per_device = batch // n
    self.graphdef, params = nnx.split(model)
    params, prefill_params, self.cache_type = layout.for_sampling(params, self.cfg, dtype,
                                                                  self.rows_per_device)
    self.params, self.prefill_params = jax.device_put((params, prefill_params),
                                                      NamedSharding(self.mesh, P()))
    self.state_sharding = NamedSharding(self.mesh, P(ROWS))
    self.patchilizer = tokenizer.Patchilizer(patch_size=self.cfg.patch_size,
                                             patch_length=self.cfg.patch_length)

  def run(self, prompts: Sequence[str], seed: int = 0,
          on_result: Callable[[Result], None] | None = None,
          header: constraint.Header | None = None,
          indices: Sequence[int] | None = None,
          on_patches: Callable[[list[Piece]], None] | None = None) -> list[Result]:
    """One piece per prompt, in order; piece i draws from the key fold_in(key(seed), i).

    `header` fixes header lines of every piece (constrained sampling only); the model writes the
    others. `indices` numbers the pieces otherwise than 0, 1, ... (a process drawing its share of
    a run's pieces): piece j is then piece indices[j], its key and Result.index. `on_result`
    gets each piece as it finishes; `on_patches`, after each compiled call, the pieces still
    being generated (their patches and text so far): progress, no draw changed.
    """
    if header is not None and not self.settings.constrained:
      raise ValueError("fixing header lines needs constrained sampling")
    indices = list(range(len(prompts)) if indices is None else indices)
    if len(indices) != len(prompts) or len(set(indices)) != len(indices):
      raise ValueError(f"{len(indices)} indices for {len(prompts)} prompts: one distinct index "
                       "per prompt")
    return _Generation(self, prompts, seed, on_result, header, indices, on_patches).run()


class _Loading(NamedTuple):
  """A context to load into a row before the next call."""
  row: int
  ids: np.ndarray  # [n, P] whole patches
  prefix: np.ndarray  # chars of the open last patch
  in_body: bool
  step: int  # patches drawn so far for the piece
  grammar: constraint.State  # where the piece stands in the constrained grammar


class _Generation:
  """One `Sampler.run`: the prompts, the rows' pieces and the device state."""

  def __init__(self, sampler: Sampler, prompts: Sequence[str], seed: int,
               on_result: Callable[[Result], None] | None, header: constraint.Header | None,
               indices: list[int],
               on_patches: Callable[[list[Piece]], None] | None):
    self.sampler = sampler
    self.indices = indices
    self.header = jax.device_put(constraint.fixed(header), NamedSharding(sampler.mesh, P()))
    self.cfg = sampler.cfg
    self.on_result, self.on_patches = on_result, on_patches
    self.base_key = jax.random.key(seed)
    self.prompts = list(prompts)
    self.encoded = [split_prompt(sampler.patchilizer, prompt) for prompt in self.prompts]
    for i, (ids, _, _) in enumerate(self.encoded):
      if len(ids) >= self.cfg.patch_length:
        raise ValueError(f"prompt {i} fills the whole context ({len(ids)} patches of "
                         f"{self.cfg.patch_length}); shorten it")
    longest = max((len(ids) for ids, _, _ in self.encoded), default=0)
    self.capacity = _bucket(longest + sampler.patches_per_call, self.cfg.patch_length, 64)
    self.state = self._placed(empty_state(self.cfg, sampler.batch, self.capacity,
                                          sampler.cache_type))
    self.slots: list[Piece | None] = [None] * sampler.batch
    self.loads: list[_Loading] = []  # prefilled before the next call
    self.finished: dict[int, Result] = {}

  def run(self) -> list[Result]:
    """Every piece, in prompt order: free rows take waiting prompts before each call."""
    waiting = collections.deque(range(len(self.prompts)))
    while waiting or any(self.slots):
      for row in range(self.sampler.batch):
        if self.slots[row] is None and waiting:
          i = waiting.popleft()
          ids, prefix, in_body = self.encoded[i]
          self.slots[row] = self._new_piece(i, in_body)
          self._load(row, ids, prefix, in_body, 0, self._prompt_grammar(i))
      self._step()
    return [self.finished[i] for i in self.indices]

  def _placed(self, state: DecodeState) -> DecodeState:
    """state with its rows over the sampler's devices, as the compiled calls were compiled for:
    an update made outside them, or their own output (which XLA may call replicated on a
    one-device mesh), would otherwise make them compile again."""
    return jax.device_put(state, self.sampler.state_sharding)

  def _new_piece(self, index: int, in_body: bool) -> Piece:
    prompt = self.prompts[index]
    piece = Piece(self.indices[index], prompt, in_body, time.perf_counter())
    if in_body:
      lines = tokenizer.text_lines(prompt)
      split = next(i for i, line in enumerate(lines) if line.startswith(("[r:", "[V:")))
      piece.prompt_head = "".join(lines[:split])
      piece.body = ["".join(lines[split:])[:len(prompt) - len("".join(lines[:split]))]]
    elif self.sampler.settings.keep_prompt_on_overflow:
      piece.prompt_head = prompt
    return piece

  def _prompt_grammar(self, index: int) -> constraint.State:
    """Where prompt `index` leaves the grammar (the start when unconstrained)."""
    if not self.sampler.settings.constrained:
      return constraint.initial()
    ids, prefix, _ = self.encoded[index]
    try:
      return constraint.advance(constraint.initial(), ids, prefix, self.header)
    except ValueError as error:
      raise ValueError(f"prompt {index} cannot be continued well-formed: {error}") from None

  def _load(self, row: int, ids: np.ndarray, prefix: np.ndarray, in_body: bool, step: int,
            grammar: constraint.State):
    self.loads.append(_Loading(row, ids, prefix, in_body, step, grammar))

  def _prefill_loads(self):
    """Prefills the queued contexts, those of one length bucket together.

    Together, the patch decoder's weights are read once for all of them (a batch starts with every
    row to fill), and a context queued for several rows (pieces from one prompt) is encoded once;
    at most PREFILL_PATCHES patches are encoded per call, which bounds the attention's memory.
    """
    loads, self.loads = self.loads, []
    if not loads:
      return
    self._ensure_capacity(max(len(load.ids) for load in loads) + self.sampler.patches_per_call)
    by_length = collections.defaultdict(list)
    for load in loads:
      by_length[_bucket(len(load.ids), self.capacity)].append(load)
    for length, group in sorted(by_length.items()):
      per_call = max(1, PREFILL_PATCHES // length)
      contexts, chunk = set(), []
      for load in group:
        context = load.ids.tobytes()
        if context not in contexts and len(contexts) == per_call:
          self._prefill(chunk, length)
          contexts, chunk = set(), []
        contexts.add(context)
        chunk.append(load)
      self._prefill(chunk, length)

  def _prefill(self, loads: list[_Loading], length: int):
    p = self.cfg.patch_size
    rows = self.sampler.rows_per_device
    per_device: list[list[_Loading]] = [[] for _ in range(self.sampler.mesh.size)]
    for load in loads:
      per_device[load.row // rows].append(load)
    indexes: list[dict[bytes, int]] = [{} for _ in per_device]
    sources = [[index.setdefault(load.ids.tobytes(), len(index)) for load in mine]
               for index, mine in zip(indexes, per_device)]
    # Rows and contexts padded to powers of two, the same on every device: few compiled shapes.
    u = _bucket(max(map(len, indexes)), rows, 1)
    k = _bucket(max(map(len, per_device)), rows, 1)
    d = len(per_device)
    patches = np.zeros((d, u, length, p), np.int32)
    n_patches = np.zeros((d, u), np.int32)
    local_rows, context, prefix_len, step, pieces = (np.zeros((d, k), np.int32) for _ in range(5))
    prefix = np.zeros((d, k, p), np.int32)
    in_body = np.zeros((d, k), bool)
    grammars = []
    for i, (mine, source_of) in enumerate(zip(per_device, sources)):
      for j, (load, source) in enumerate(zip(mine, source_of)):
        patches[i, source, :len(load.ids)], n_patches[i, source] = load.ids, len(load.ids)
        local_rows[i, j], context[i, j], step[i, j] = load.row % rows, source, load.step
        prefix[i, j, :len(load.prefix)], prefix_len[i, j] = load.prefix, len(load.prefix)
        in_body[i, j], pieces[i, j] = load.in_body, self.slots[load.row].index
      grammars.append(constraint.batch([load.grammar for load in mine] +
                                       [constraint.initial()] * (k - len(mine))))
    keys = jax.vmap(jax.random.fold_in, (None, 0))(self.base_key, jnp.asarray(pieces.ravel()))
    load = Load(patches=jnp.asarray(patches), n_patches=jnp.asarray(n_patches),
                row=jnp.asarray(local_rows), context=jnp.asarray(context),
                prefix=jnp.asarray(prefix), prefix_len=jnp.asarray(prefix_len),
                in_body=jnp.asarray(in_body), key=jax.random.key_data(keys).reshape(d, k, -1), step=jnp.asarray(step),
                grammar=jax.tree.map(lambda *xs: jnp.stack(xs), *grammars),
                count=jnp.asarray([len(mine) for mine in per_device], jnp.int32))
    self.state = self._placed(_prefill(self.sampler.graphdef, self.sampler.prefill_params,
                                       self.state, load, self.sampler.mesh))

  def _ensure_capacity(self, need: int):
    if need > self.capacity and self.capacity < self.cfg.patch_length:
      self.capacity = _bucket(need, self.cfg.patch_length, 64)
      self.state = self._placed(_grow(self.state, self.capacity))

  def _finish(self, row: int, ok: bool, reason: str = "", ended: bool = False):
    piece = self.slots[row]
    self.slots[row] = None
    self.state = self._placed(self.state.replace(active=self.state.active.at[row].set(False)))
    text = piece.prompt + "".join(piece.text)
    if self.sampler.settings.constrained and not ended:
      # A piece stopped inside a line keeps its complete lines: what it wrote stays well-formed.
      text = whole_lines(text)
      if not any(line.startswith(BODY_MARKER) for line in text.split("\n")):
        ok, reason = False, reason or "stopped before its first complete line"
    result = Result(piece.index, piece.prompt, text, ok, reason,
                    piece.patches, piece.overflows, time.perf_counter() - piece.start_time)
    self.finished[piece.index] = result
    if self.on_result:
      self.on_result(result)

  def _step(self):
    sampler = self.sampler
    self._prefill_loads()
    self._ensure_capacity(int(np.max(np.asarray(self.state.length))) + sampler.patches_per_call)
    state, outputs = _generate(sampler.graphdef, sampler.params, self.state, sampler.settings,
                               sampler.patches_per_call, self.header, sampler.mesh)
    self.state = self._placed(state)
    patches, events, text_from = map(np.asarray, outputs)
    settings = sampler.settings
    for row, piece in enumerate(self.slots):
      if piece is None:
        continue
      for n in range(sampler.patches_per_call):
        event = events[n, row]
        if event == IDLE:
          break
        if event == ENDED:
          self._finish(row, True, ended=True)
          break
        if event == DEAD:
          self._finish(row, True, "no well-formed continuation: cut after its last complete line")
          break
        piece.append(sampler.patchilizer.decode([patches[n, row, text_from[n, row]:]]))
        if piece.chars > settings.max_chars:
          self._finish(row, False, f"more than {settings.max_chars} characters")
          break
        if (settings.max_patches and piece.patches >= settings.max_patches and
            (not settings.constrained or piece.at_body_line_end)):
          self._finish(row, True, f"stopped after {piece.patches} patches")
          break
        if event == FULL:
          self._overflow(row, piece)
          break
      if self.slots[row] is piece and time.perf_counter() - piece.start_time > settings.max_seconds:
        self._finish(row, False, f"more than {settings.max_seconds:g} s")
    if self.on_patches:
      self.on_patches([piece for piece in self.slots if piece is not None])

  def _overflow(self, row: int, piece: Piece):
    piece.overflows += 1
    text = overflow_context(piece)
    if text is None:
      # The original stops here and keeps the piece: its context held no complete body line.
      self._finish(row, True, "context full of metadata")
      return
    ids, prefix, _ = split_prompt(self.sampler.patchilizer, text)
    if len(ids) >= self.cfg.patch_length:
      self._finish(row, False, "context still full after keeping half of the body lines")
      return
    # The piece goes on where it stands in the grammar (only the model's context was cut).
    grammar = jax.tree.map(lambda a: a[row], self.state.grammar)
    self._load(row, ids, prefix, True, piece.patches, grammar)
