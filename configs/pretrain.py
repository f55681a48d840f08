"""Pre-training (the original's hyper-parameters): `--config=configs/pretrain.py:small`."""

from notagen_jax import config as config_lib


def get_config(size: str = "small"):
  c = config_lib.base_config("pretrain", size)
  c.data.shards_dir = ""  # the dir `python -m notagen_jax.prepare` prints after "shards:"
  return c
