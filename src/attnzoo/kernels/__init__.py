"""Shared executors: dense (with log-sum-exp and exact merges), block-sparse (strip, blocks, gather,
FlexAttention), linear (one pass, chunked, Triton; with a carried state), dispatched through one
vocabulary of backend names (:mod:`.backends`)."""
