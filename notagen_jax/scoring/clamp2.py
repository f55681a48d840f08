"""CLaMP 2's music encoder (M3) in JAX: the embedder that CLaMP-DPO scores pieces with.

Each stage does what the original code does (sanderwood/clamp2, of which NotaGen ships a copy in
clamp2/), checked against features that code produced (tests/test_clamp2.py):
- `patchify`: extract_clamp2.py drops comment lines, then utils.py's M3Patchilizer.encode.
- `M3Encoder`: M3PatchEncoder (a Linear over one-hot patches into a transformers BertModel) and
  CLaMP2Model.get_music_features(get_normalized=True): masked mean of the last hidden state, then
  music_proj. "Normalized" there means pooled and projected; there is no L2 normalization.
- `chunks` and `Clamp2Embedder.embed`: extract_feature's segments and their weighted average.

The chunks of all pieces go through one jitted forward in batches of static shape: the batch is
padded to a power of two and the sequence to the shortest of L, L/2, L/4, ... that holds its longest
chunk. Padding patches are masked out of attention and pooling and the position embeddings are
absolute, so the shorter sequence gives the original's numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from unidecode import unidecode

from notagen_jax import storage

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
# The original's BertConfig: num_attention_heads = M3_HIDDEN_SIZE // 64, layer_norm_eps default.
HEAD_DIM = 64
LN_EPS = 1e-12
# Alternatives in the original's order: at each position the first that matches wins ('||' before
# '|', but '|:' before '||').
BARLINES = ("|:", "::", ":|", "[|", "||", "|]", "|")
_BARLINE = re.compile("(" + "|".join(map(re.escape, BARLINES)) + ")")
_LINE = re.compile(r".*?\n|.*$")
# Full float32 matmuls: TF32 or one-pass bf16 (accelerator defaults) would miss the golden features.
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Patchifier.


def _drop_comment_lines(text: str) -> str:
  """The text as extract_feature reads it: a text-mode file read (universal newlines), less the
  lines that start with one '%' (a '%%' directive stays)."""
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  parts = text.split("\n")
  lines = [part + "\n" for part in parts[:-1]] + [parts[-1]]
  return "".join(line for line in lines if not line.startswith("%") or line.startswith("%%"))


def _split_bars(line: str) -> list[str]:
  """A body line's bars, each ending with its barline; a leading barline joins the first bar."""
  parts = [part for part in _BARLINE.split(line) if part]
  if parts[0] in BARLINES:
    if len(parts) == 1:
      # The original raises IndexError here, and extract_clamp2 skips the piece.
      raise ValueError(f"a last line that is a lone barline ({line!r}) fails the original")
    parts = [parts[0] + parts[1]] + parts[2:]
  # (bar, barline) pairs: text after the last barline (the line's '\n' included) is dropped, and
  # so is a line with no barline at all.
  return [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]


def _mtf_patches(lines: list[str], patch_size: int) -> list[str]:
  """MIDI text format: messages of one kind share a patch, tab-separated, while they fit."""
  patches, patch = [], ""
  for line in lines:
    kind, *args = line.split(" ")
    args = " ".join(args)
    if patch.startswith(kind) and len(patch) + len(args) <= patch_size - 2:
      patch = patch[:-1] + "\t" + args
    else:
      if patch:
        patches.append(patch)
      patch = line
  if patch:
    patches.append(patch)
  return patches


def patch_strings(text: str, patch_size: int = 64) -> list[str]:
  """The patches of M3Patchilizer.encode as text, before the bos/eos patches and the cut."""
  lines = [line for line in _LINE.findall(unidecode(_drop_comment_lines(text))) if line]
  if not lines:
    raise ValueError("empty piece")
  if lines[0].split(" ")[0] == "ticks_per_beat":
    return _mtf_patches(lines, patch_size)
  patches = []
  for line in lines:
    if len(line) > 1 and ((line[0].isalpha() and line[1] == ":") or line.startswith("%%")):
      patches.append(line)  # a header line (`X:`, `V:1 ...`, `%%score ...`) is one patch
    else:
      bars = _split_bars(line)
      if bars:
        bars[-1] += "\n"
        patches.extend(bars)
  return patches


def patchify(text: str, patch_size: int = 64) -> np.ndarray:
  """int32 [N, patch_size]: the patch ids extract_feature encodes a piece as, bos/eos included.

  Each patch is [1] + its character codes + [2], cut to patch_size and padded with 0; the bos patch
  is all 1, the eos patch [1] then 2s. Raises ValueError where the original fails on the text.
  """
  patches = patch_strings(text, patch_size)
  ids = np.zeros((len(patches) + 2, patch_size), np.int32)
  ids[0] = BOS
  ids[-1] = EOS
  ids[-1, 0] = BOS
  for row, patch in zip(ids[1:-1], patches):
    codes = [BOS, *map(ord, patch), EOS][:patch_size]
    row[:len(codes)] = codes
  if ids.max() >= VOCAB:  # unidecode gives ASCII; the original's one_hot would raise
    raise ValueError(f"character code {ids.max()} is out of the {VOCAB}-code vocabulary")
  return ids


def chunks(n: int, length: int) -> list[tuple[int, int, int]]:
  """(start, end, weight) of the chunks extract_feature encodes an n-patch piece as.

  Chunks of `length` patches; the last is the final `length` patches, which overlaps the chunk
  before it when `length` does not divide n, yet is weighted by the remainder n % length alone.
  """
  full, rest = divmod(n, length)
  out = [(i * length, (i + 1) * length, length) for i in range(full)]
  if rest:
    out.append((max(0, n - length), n, rest))
  return out


# ----------------------------------------------------------------------------------------------
# Encoder.


@dataclasses.dataclass(frozen=True)
class M3Config:
  """Sizes of the music branch; the defaults are the released CLaMP 2's."""
  patch_size: int = 64
  patch_length: int = 512
  layers: int = 12
  hidden: int = 768
  intermediate: int = 3072
  out_dim: int = 768  # CLAMP2_HIDDEN_SIZE, music_proj's output

  def __post_init__(self):
    if self.heads < 1 or self.hidden % self.heads:
      raise ValueError(f"hidden {self.hidden} does not split into hidden // {HEAD_DIM} heads")

  @property
  def heads(self) -> int:
    return self.hidden // HEAD_DIM


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], init: str = "normal") -> nnx.Param:
  if init == "normal":
    return nnx.Param(0.02 * jax.random.normal(rngs.params(), shape, jnp.float32))
  return nnx.Param(jnp.full(shape, 1.0 if init == "ones" else 0.0, jnp.float32))


class LayerNorm(nnx.Module):

  def __init__(self, size: int, rngs: nnx.Rngs):
    self.scale = _param(rngs, (size,), "ones")
    self.bias = _param(rngs, (size,), "zeros")

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * self.scale[...] + self.bias[...]


class EncoderLayer(nnx.Module):
  """A BERT layer: post-LN self-attention and a GELU (erf) MLP."""

  def __init__(self, cfg: M3Config, rngs: nnx.Rngs):
    h, n, d = cfg.hidden, cfg.heads, cfg.hidden // cfg.heads
    self.q, self.k, self.v = (_param(rngs, (h, n, d)) for _ in range(3))
    self.q_bias, self.k_bias, self.v_bias = (_param(rngs, (n, d), "zeros") for _ in range(3))
    self.attn_out = _param(rngs, (n, d, h))
    self.attn_out_bias = _param(rngs, (h,), "zeros")
    self.ln_1 = LayerNorm(h, rngs)
    self.fc = _param(rngs, (h, cfg.intermediate))
    self.fc_bias = _param(rngs, (cfg.intermediate,), "zeros")
    self.proj = _param(rngs, (cfg.intermediate, h))
    self.proj_bias = _param(rngs, (h,), "zeros")
    self.ln_2 = LayerNorm(h, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, T, H]; mask [B, 1, 1, T], True for the keys that may be attended."""
    q, k, v = (jnp.einsum("bth,hnd->btnd", x, w[...], precision=_HIGHEST) + b[...]
               for w, b in ((self.q, self.q_bias), (self.k, self.k_bias), (self.v, self.v_bias)))
    scores = jnp.einsum("btnd,bsnd->bnts", q, k, precision=_HIGHEST) / math.sqrt(q.shape[-1])
    # BERT adds finfo.min at masked keys: their weights underflow to exactly 0, as here.
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    y = jnp.einsum("bnts,bsnd->btnd", probs, v, precision=_HIGHEST)
    y = jnp.einsum("btnd,ndh->bth", y, self.attn_out[...], precision=_HIGHEST)
    x = self.ln_1(y + self.attn_out_bias[...] + x)
    y = jnp.dot(x, self.fc[...], precision=_HIGHEST) + self.fc_bias[...]
    y = jnp.dot(jax.nn.gelu(y, approximate=False), self.proj[...], precision=_HIGHEST)
    return self.ln_2(y + self.proj_bias[...] + x)


class M3Encoder(nnx.Module):
  """M3PatchEncoder and music_proj: one-hot patches -> Linear -> BERT -> masked mean -> Linear."""

  def __init__(self, cfg: M3Config, rngs: nnx.Rngs):
    self.cfg = cfg
    self.patch_embed = _param(rngs, (cfg.patch_size * VOCAB, cfg.hidden))
    self.patch_embed_bias = _param(rngs, (cfg.hidden,), "zeros")
    self.pos = _param(rngs, (cfg.patch_length, cfg.hidden))
    # Row 0 of BERT's token-type table: every token has type 0 (zeros if a checkpoint has none).
    self.token_type = _param(rngs, (cfg.hidden,))
    self.ln_embed = LayerNorm(cfg.hidden, rngs)
    self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.layers)])
    self.music_proj = _param(rngs, (cfg.hidden, cfg.out_dim))
    self.music_proj_bias = _param(rngs, (cfg.out_dim,), "zeros")

  def hidden_states(self, patches: jax.Array, mask: jax.Array) -> jax.Array:
    """patches [B, T, P] int (T <= patch_length), mask [B, T] -> BERT's last_hidden_state."""
    b, t, p = patches.shape
    one_hot = jax.nn.one_hot(patches, VOCAB, dtype=jnp.float32).reshape(b, t, p * VOCAB)
    x = jnp.dot(one_hot, self.patch_embed[...], precision=_HIGHEST) + self.patch_embed_bias[...]
    x = self.ln_embed(x + self.token_type[...] + self.pos[...][:t])
    key_mask = mask.astype(bool)[:, None, None, :]
    for layer in self.layers:
      x = layer(x, key_mask)
    return x

  def __call__(self, patches: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, out_dim]: the masked mean of the last hidden state, projected (the chunk feature)."""
    weights = mask.astype(jnp.float32)[..., None]
    hidden = self.hidden_states(patches, mask)
    # An all-padding row (batch filler) divides by 1, not 0; real chunks have >= 1 patch.
    pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return jnp.dot(pooled, self.music_proj[...], precision=_HIGHEST) + self.music_proj_bias[...]


# ----------------------------------------------------------------------------------------------
# Weight import from CLaMP 2's PyTorch checkpoint.

Path = tuple[Any, ...]
MUSIC = "music_model."
BERT = MUSIC + "base."
PROJ = "music_proj."
PATCH_EMBED = MUSIC + "patch_embedding.weight"
POSITIONS = BERT + "embeddings.position_embeddings.weight"
TOKEN_TYPE = BERT + "embeddings.token_type_embeddings.weight"
# The text branch (XLM-R and its projection) and the contrastive temperature: not ours to read.
IGNORED_PREFIXES = ("text_model.", "text_proj.", "logit_scale")
# Music-branch tensors that no feature depends on: BERT's word embedding (inputs_embeds stand in
# for it), its pooler (CLaMP 2 pools by itself) and buffers that older transformers saved.
UNUSED = (BERT + "embeddings.word_embeddings.weight", BERT + "pooler.dense.weight",
          BERT + "pooler.dense.bias", BERT + "embeddings.position_ids",
          BERT + "embeddings.token_type_ids")
# Our path in a layer -> BERT's name; 'linear' is a torch Linear weight ([out, in], transposed).
_LAYER = (
    (("q",), "attention.self.query.weight", "linear"),
    (("q_bias",), "attention.self.query.bias", "copy"),
    (("k",), "attention.self.key.weight", "linear"),
    (("k_bias",), "attention.self.key.bias", "copy"),
    (("v",), "attention.self.value.weight", "linear"),
    (("v_bias",), "attention.self.value.bias", "copy"),
    (("attn_out",), "attention.output.dense.weight", "linear"),
    (("attn_out_bias",), "attention.output.dense.bias", "copy"),
    (("ln_1", "scale"), "attention.output.LayerNorm.weight", "copy"),
    (("ln_1", "bias"), "attention.output.LayerNorm.bias", "copy"),
    (("fc",), "intermediate.dense.weight", "linear"),
    (("fc_bias",), "intermediate.dense.bias", "copy"),
    (("proj",), "output.dense.weight", "linear"),
    (("proj_bias",), "output.dense.bias", "copy"),
    (("ln_2", "scale"), "output.LayerNorm.weight", "copy"),
    (("ln_2", "bias"), "output.LayerNorm.bias", "copy"),
)


def name_map(cfg: M3Config) -> list[tuple[Path, str, str]]:
  """(our path, state-dict key, transform) for every tensor we read; token type is apart."""
  entries = [
      (("patch_embed",), PATCH_EMBED, "linear"),
      (("patch_embed_bias",), MUSIC + "patch_embedding.bias", "copy"),
      (("pos",), POSITIONS, "copy"),
      (("ln_embed", "scale"), BERT + "embeddings.LayerNorm.weight", "copy"),
      (("ln_embed", "bias"), BERT + "embeddings.LayerNorm.bias", "copy"),
      (("music_proj",), PROJ + "weight", "linear"),
      (("music_proj_bias",), PROJ + "bias", "copy"),
  ]
  for i in range(cfg.layers):
    entries += [(("layers", i) + path, f"{BERT}encoder.layer.{i}.{name}", kind)
                for path, name, kind in _LAYER]
  return entries


def torch_shapes(cfg: M3Config) -> dict[str, tuple[int, ...]]:
  """Every tensor the features need, with its shape in the PyTorch checkpoint."""
  h, i = cfg.hidden, cfg.intermediate
  layer = {"attention.self.query.weight": (h, h), "attention.self.query.bias": (h,),
           "attention.self.key.weight": (h, h), "attention.self.key.bias": (h,),
           "attention.self.value.weight": (h, h), "attention.self.value.bias": (h,),
           "attention.output.dense.weight": (h, h), "attention.output.dense.bias": (h,),
           "attention.output.LayerNorm.weight": (h,), "attention.output.LayerNorm.bias": (h,),
           "intermediate.dense.weight": (i, h), "intermediate.dense.bias": (i,),
           "output.dense.weight": (h, i), "output.dense.bias": (h,),
           "output.LayerNorm.weight": (h,), "output.LayerNorm.bias": (h,)}
  shapes = {PATCH_EMBED: (h, cfg.patch_size * VOCAB), MUSIC + "patch_embedding.bias": (h,),
            POSITIONS: (cfg.patch_length, h), BERT + "embeddings.LayerNorm.weight": (h,),
            BERT + "embeddings.LayerNorm.bias": (h,)}
  shapes.update({f"{BERT}encoder.layer.{n}.{name}": shape
                 for n in range(cfg.layers) for name, shape in layer.items()})
  shapes.update({PROJ + "weight": (cfg.out_dim, h), PROJ + "bias": (cfg.out_dim,)})
  return shapes


def config_from_state_dict(state_dict: Mapping[str, Any]) -> M3Config:
  """The sizes read off the tensor shapes (heads are hidden // 64, as the original sets them)."""
  needed = [POSITIONS, PATCH_EMBED, PROJ + "weight"]
  missing = [key for key in needed if key not in state_dict]
  if missing:
    raise ValueError(f"not a CLaMP 2 music branch: cannot infer its size, missing {missing}")
  patch_length, hidden = np.shape(state_dict[POSITIONS])
  patch_in = np.shape(state_dict[PATCH_EMBED])[1]
  if patch_in % VOCAB:
    raise ValueError(f"shape of {PATCH_EMBED}: {list(np.shape(state_dict[PATCH_EMBED]))}, "
                     f"input size not a multiple of {VOCAB}")
  # Highest index + 1, so that a gap shows up as missing tensors in the check.
  layers = 1 + max((int(m.group(1)) for key in state_dict
                    if (m := re.match(re.escape(BERT) + r"encoder\.layer\.(\d+)\.", key))),
                   default=-1)
  fc = state_dict.get(f"{BERT}encoder.layer.0.intermediate.dense.weight")
  return M3Config(patch_size=patch_in // VOCAB, patch_length=patch_length, layers=layers,
                  hidden=hidden, intermediate=4 * hidden if fc is None else np.shape(fc)[0],
                  out_dim=np.shape(state_dict[PROJ + "weight"])[0])


def check_state_dict(state_dict: Mapping[str, Any], cfg: M3Config) -> None:
  """Raises one error naming every missing, mis-shaped or unexpected music-branch tensor."""
  expected = torch_shapes(cfg)
  problems = [f"missing {key} {list(shape)}" for key, shape in expected.items()
              if key not in state_dict]
  problems += [f"shape of {key}: {list(np.shape(state_dict[key]))}, expected {list(shape)}"
               for key, shape in expected.items()
               if key in state_dict and tuple(np.shape(state_dict[key])) != shape]
  if TOKEN_TYPE in state_dict:
    shape = np.shape(state_dict[TOKEN_TYPE])
    if len(shape) != 2 or shape[0] < 1 or shape[1] != cfg.hidden:
      problems.append(f"shape of {TOKEN_TYPE}: {list(shape)}, expected [types, {cfg.hidden}]")
  problems += [f"unexpected {key}" for key in state_dict
               if key not in expected and key != TOKEN_TYPE and key not in UNUSED
               and not key.startswith(IGNORED_PREFIXES)]
  if problems:
    raise ValueError(f"state dict does not match CLaMP 2's music branch (layers {cfg.layers}, "
                     f"hidden {cfg.hidden}, patch_length {cfg.patch_length}, patch_size "
                     f"{cfg.patch_size}):\n  " + "\n  ".join(problems))


def _set(tree: dict, path: Path, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def params_from_state_dict(state_dict: Mapping[str, Any], cfg: M3Config | None = None
                           ) -> tuple[M3Config, dict]:
  """(config, our pure param dict) from a CLaMP 2 state dict of numpy arrays."""
  cfg = cfg or config_from_state_dict(state_dict)
  check_state_dict(state_dict, cfg)
  shapes = _our_shapes(cfg)
  params: dict = {}
  for path, key, kind in name_map(cfg):
    value = np.asarray(state_dict[key], np.float32)
    _set(params, path, (value.T if kind == "linear" else value).reshape(shapes[path]))
  token_type = state_dict.get(TOKEN_TYPE)
  params["token_type"] = (np.zeros(cfg.hidden, np.float32) if token_type is None
                          else np.asarray(token_type, np.float32)[0])
  return cfg, params


def _get(tree: Any, path: Path) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _our_shapes(cfg: M3Config) -> dict[Path, tuple[int, ...]]:
  tree = nnx.to_pure_dict(nnx.state(_abstract(cfg)))
  return {path: tuple(_get(tree, path).shape) for path, _, _ in name_map(cfg)}


def _abstract(cfg: M3Config) -> M3Encoder:
  return nnx.eval_shape(lambda: M3Encoder(cfg, nnx.Rngs(0)))


def build(cfg: M3Config, params: Mapping) -> M3Encoder:
  """An encoder of `cfg` holding `params` (a pure dict as `params_from_state_dict` gives)."""
  graphdef, state = nnx.split(_abstract(cfg))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dict(params)))
  return nnx.merge(graphdef, state)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The music-branch tensors (float32 numpy) of a CLaMP 2 `.pth`: `{'checkpoint_model': sd}`,
  `{'model': sd, 'epoch': ..., ...}` as CLaMP 2 saves it, or a bare state dict."""
  import torch  # pylint: disable=import-outside-toplevel
  with storage.path(path).open("rb") as f:  # local or gs:// (a seekable fsspec file)
    obj = torch.load(f, map_location="cpu", weights_only=True)
  for wrapper in ("checkpoint_model", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
      break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds no state dict (got {type(obj).__name__})")
  out = {}
  for key, value in obj.items():
    if key.startswith(IGNORED_PREFIXES):
      continue  # the text branch: hundreds of MB never converted
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
    out[key] = value.detach().to(torch.float32).numpy()
  return out


def load_model(path: str | os.PathLike) -> M3Encoder:
  """The music encoder of a CLaMP 2 PyTorch checkpoint, its sizes read off the tensors."""
  return build(*params_from_state_dict(load_state_dict(path)))


# ----------------------------------------------------------------------------------------------
# The embedder.


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef: nnx.GraphDef, state: nnx.State, patches: jax.Array,
              mask: jax.Array) -> jax.Array:
  # Module-level, the graph static: embedders of one size share the compiled shapes.
  return nnx.merge(graphdef, state)(patches, mask)


class Clamp2Embedder:
  """CLaMP 2 features of ABC pieces, as extract_clamp2.py's extract_feature(normalize=True).

  `max_tokens` bounds the patches of one forward (batch x sequence): the one-hot input alone is
  max_tokens x patch_size x 128 float32 (512 MiB at the default and the full size).
  """
  name = "clamp2"

  def __init__(self, model: M3Encoder, max_tokens: int = 16384):
    self.model = model
    self.cfg = model.cfg
    self.max_tokens = max_tokens
    self._graphdef, self._state = nnx.split(model)

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> Clamp2Embedder:
    return cls(load_model(path), **kwargs)

  def _sequence(self, longest: int) -> int:
    """The static sequence length for a batch: L halved while its longest chunk still fits."""
    seq = self.cfg.patch_length
    while seq % 2 == 0 and seq // 2 >= max(longest, 32):
      seq //= 2
    return seq

  def chunk_features(self, pieces: Sequence[np.ndarray]) -> np.ndarray:
    """float32 [C, out_dim]: the feature of each chunk (ids [n <= patch_length, patch_size])."""
    cfg = self.cfg
    out = np.zeros((len(pieces), cfg.out_dim), np.float32)
    # Longest first, so that each batch's sequence bucket is tight.
    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i]))
    batches, done = [], 0
    while done < len(order):
      seq = self._sequence(len(pieces[order[done]]))
      rows = 1 << (max(1, self.max_tokens // seq).bit_length() - 1)
      take = order[done:done + rows]
      size = min(rows, _pow2_at_least(len(take)))
      patches = np.zeros((size, seq, cfg.patch_size), np.int32)
      mask = np.zeros((size, seq), bool)
      for row, i in enumerate(take):
        patches[row, :len(pieces[i])] = pieces[i]
        mask[row, :len(pieces[i])] = True
      # Dispatched without waiting: the next batch is laid out while this one runs.
      batches.append((take, _features(self._graphdef, self._state, patches, mask)))
      done += len(take)
    for take, features in batches:
      out[take] = np.asarray(features)[:len(take)]
    return out

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [len(texts), out_dim]; NaN rows for the texts the original cannot patchify."""
    cfg = self.cfg
    out = np.full((len(texts), cfg.out_dim), np.nan, np.float32)
    jobs, segments = [], []
    for index, text in enumerate(texts):
      try:
        ids = patchify(text, cfg.patch_size)
      except ValueError:
        continue
      for start, end, weight in chunks(len(ids), cfg.patch_length):
        jobs.append((index, weight))
        segments.append(ids[start:end])
    if not jobs:
      return out
    features = self.chunk_features(segments)
    index = np.array([i for i, _ in jobs])
    weights = np.array([w for _, w in jobs], np.float32)[:, None]
    for i in np.unique(index):
      rows = index == i
      # As the original: sum of weight x feature over the chunks, over the sum of the weights.
      out[i] = (features[rows] * weights[rows]).sum(0) / weights[rows].sum()
    return out
