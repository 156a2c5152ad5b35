"""Compute kernels of aio-engine: each file holds a plain-torch reference (used on CPU) and, on
CUDA, its Triton version. Kept free of imports on purpose: the name `kernels` is also the name of
a Hugging Face hub package, and transformers must not mistake this package for it."""
