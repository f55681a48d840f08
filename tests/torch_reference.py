"""NotaGen's PyTorch model rebuilt from transformers' GPT-2, for parity tests and benchmarks.

Same module names (so state-dict keys match the original checkpoints), same forward: the patch-level
GPT2Model over a Linear of one-hot patches, the char-level GPT2LMHeadModel over
[patch output, emb(c1..c16)], HF's mean cross-entropy as the loss and the summed log-prob of the RL
code. Masks are copied, not mutated in place as the original does.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

VOCAB = 128
BOS = 1


class PatchLevelDecoder(torch.nn.Module):

  def __init__(self, config: GPT2Config, patch_size: int):
    super().__init__()
    self.patch_size = patch_size
    self.patch_embedding = torch.nn.Linear(patch_size * VOCAB, config.n_embd)
    torch.nn.init.normal_(self.patch_embedding.weight, std=0.02)
    self.base = GPT2Model(config)

  def forward(self, patches: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    x = torch.nn.functional.one_hot(patches, num_classes=VOCAB).float()
    x = self.patch_embedding(x.reshape(len(patches), -1, self.patch_size * VOCAB))
    return self.base(inputs_embeds=x, attention_mask=masks)["last_hidden_state"]


class CharLevelDecoder(torch.nn.Module):

  def __init__(self, config: GPT2Config):
    super().__init__()
    self.base = GPT2LMHeadModel(config)

  def forward(self, encoded: torch.Tensor, targets: torch.Tensor):
    """Returns (HF loss, [N] summed log-prob of each target patch's real chars)."""
    targets = torch.cat((torch.full_like(targets[:, :1], BOS), targets), dim=1)
    labels = targets.masked_fill(targets == 0, -100)
    attention_mask = (labels != -100).long()
    embeds = torch.nn.functional.embedding(targets, self.base.transformer.wte.weight)
    embeds = torch.cat((encoded.unsqueeze(1), embeds[:, 1:]), dim=1)
    out = self.base(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
    logprobs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    shifted = labels[:, 1:]
    picked = logprobs.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_patch = (picked * (shifted != -100)).sum(-1)
    return out.loss, per_patch

  def first_char_probs(self, encoded: torch.Tensor) -> torch.Tensor:
    """The original `generate` step with only [bos] generated: softmax at position 0."""
    out = self.base(inputs_embeds=encoded.reshape(len(encoded), 1, -1))
    return torch.softmax(out.logits[:, -1], dim=-1)


class NotaGen(torch.nn.Module):
  """The original NotaGenLMHeadModel's parameters and forward."""

  def __init__(self, patch_length: int, patch_layers: int, char_layers: int, hidden: int,
               patch_size: int = 16, attn_implementation: str = "eager"):
    super().__init__()
    self.patch_size = patch_size
    heads = hidden // 64
    patch_config = GPT2Config(num_hidden_layers=patch_layers, max_length=patch_length,
                              max_position_embeddings=patch_length, n_embd=hidden,
                              num_attention_heads=heads, vocab_size=1)
    char_config = GPT2Config(num_hidden_layers=char_layers, max_length=patch_size + 1,
                             max_position_embeddings=patch_size + 1, hidden_size=hidden,
                             num_attention_heads=heads, vocab_size=VOCAB)
    patch_config._attn_implementation = attn_implementation
    char_config._attn_implementation = attn_implementation
    self.patch_level_decoder = PatchLevelDecoder(patch_config, patch_size)
    self.char_level_decoder = CharLevelDecoder(char_config)

  def forward(self, patches: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """patches [B, L, 16] (or [B, L*16]) int64, masks [B, L]: loss, sum_logprob, per-patch, hidden."""
    patches = patches.reshape(len(patches), -1, self.patch_size)
    masks = masks.clone()
    hidden = self.patch_level_decoder(patches, masks)
    left_shift_masks = masks * (masks.flip(1).cumsum(1).flip(1) > 1)
    masks[:, 0] = 0
    loss, per_patch = self.char_level_decoder(hidden[left_shift_masks == 1], patches[masks == 1])
    return {"loss": loss, "sum_logprob": per_patch.sum(), "per_patch_logprob": per_patch,
            "hidden": hidden}

  def next_char_probs(self, patches: torch.Tensor) -> torch.Tensor:
    """First-character distribution of the patch after the whole (unpadded) piece, [B, 128]."""
    patches = patches.reshape(len(patches), -1, self.patch_size)
    hidden = self.patch_level_decoder(patches)
    return self.char_level_decoder.first_char_probs(hidden[:, -1])


def from_state_dict(state_dict: dict[str, torch.Tensor], **kwargs) -> NotaGen:
  """A reference model sized from a NotaGen state dict, loaded with strict=True."""
  wpe = state_dict["patch_level_decoder.base.wpe.weight"]
  n_layers = lambda prefix: len({k[len(prefix):].split(".")[0] for k in state_dict
                                 if k.startswith(prefix)})
  model = NotaGen(patch_length=wpe.shape[0],
                  patch_layers=n_layers("patch_level_decoder.base.h."),
                  char_layers=n_layers("char_level_decoder.base.transformer.h."),
                  hidden=wpe.shape[1], **kwargs)
  model.load_state_dict(state_dict, strict=True)
  return model.eval()
