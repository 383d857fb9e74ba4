"""Shared linear-attention executors: non-causal (one pass), causal chunked (PyTorch), a Triton
kernel for the chunked causal form on GPU, and the quadratic references they are tested against."""

from .chunked import BACKENDS, linear_attention, state_product
from .naive import decay_matrix, naive_linear_attention, work_dtype

__all__ = ["BACKENDS", "decay_matrix", "linear_attention", "naive_linear_attention", "state_product", "work_dtype"]
