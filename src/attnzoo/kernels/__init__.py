"""Shared executors: dense, block-sparse (gather-GEMM and FlexAttention backends), linear."""
