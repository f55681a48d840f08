"""Checkpoint conversion between NotaGen's PyTorch files and ours.

  python -m notagen_jax.port from-torch CKPT.pth|CKPT.safetensors OUT_DIR
  python -m notagen_jax.port to-torch CKPT_DIR|CKPT.pth OUT.pth [--safetensors OUT.safetensors]
"""

from __future__ import annotations

import argparse
import sys

from notagen_jax import checkpoint
from notagen_jax import torch_port


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m notagen_jax.port", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  from_torch = commands.add_parser("from-torch", help="NotaGen .pth/.safetensors -> Orbax dir")
  from_torch.add_argument("checkpoint")
  from_torch.add_argument("out_dir")
  to_torch = commands.add_parser("to-torch", help="our checkpoint -> NotaGen .pth")
  to_torch.add_argument("checkpoint")
  to_torch.add_argument("out_pth")
  to_torch.add_argument("--safetensors", help="also write this .safetensors file")
  args = parser.parse_args(argv)

  model = checkpoint.load_model(args.checkpoint)
  if args.command == "from-torch":
    checkpoint.save_params(args.out_dir, model)
    print(f"wrote {args.out_dir} ({model.cfg.patch_layers}/{model.cfg.char_layers} layers, "
          f"hidden {model.cfg.hidden}, patch_length {model.cfg.patch_length})")
    return
  state_dict = checkpoint.export_state_dict(model)
  torch_port.save_pth(state_dict, args.out_pth)
  print(f"wrote {args.out_pth} ({len(state_dict)} tensors)")
  if args.safetensors:
    torch_port.save_safetensors(state_dict, args.safetensors)
    print(f"wrote {args.safetensors}")


if __name__ == "__main__":
  main(sys.argv[1:])
