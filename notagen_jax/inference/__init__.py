"""How weights are stored and multiplied for sampling: what the sampler needs and the model does not.

weights.py     stored formats (bfloat16, int8, float32 in column blocks) and their product
kv_cache.py    the KV cache whose generation steps attend with the CPU kernel
cpu_kernels.py the optional CPU kernels (XLA FFI, cpu_kernels.cc compiled on first use)
layout.py      which of these a sampler takes, from the dtype asked and the weights' devices
"""
