"""Fine-tuning on prompt-conditioned data: `--config=configs/finetune.py:small`.

Keys within +-3 semitones of the original (weights 1,2,3,4,3,2,1), the three `%` prompt lines kept,
lr 1e-5, starting from a pre-trained checkpoint (ours, or an original NotaGen .pth).
"""

from notagen_jax import config as config_lib


def get_config(size: str = "small"):
  c = config_lib.base_config("finetune", size)
  c.data.shards_dir = ""
  c.init_checkpoint = ""
  return c
