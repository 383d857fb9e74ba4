"""Shared linear-attention executors: non-causal (``one_pass``), causal chunked (``chunked``, PyTorch),
a Triton kernel for the chunked causal form (``triton``), dispatched by :func:`linear_executor`,
with a state that carries a sequence across calls, and the quadratic references they are tested
against."""

from .chunked import (
           BACKENDS,
           LINEAR,
           choose_backend,
           linear_attention,
           linear_executor,
           state_product,
)
from .naive import decay_matrix, naive_linear_attention, work_dtype

__all__ = ["BACKENDS", "LINEAR", "choose_backend", "decay_matrix", "linear_attention", "linear_executor",
           "naive_linear_attention", "state_product", "work_dtype"]
