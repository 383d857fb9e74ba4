"""Throwaway methods for the bench tests, registered for one test and removed after it."""

from dataclasses import dataclass

import pytest

from attnzoo.kernels.dense import sdpa
from attnzoo.method import Method, MethodInfo
from attnzoo.registry import METHODS, register


def _throwaway(name: str, forward, doc: str) -> type[Method]:
    """A registered-able method named ``name`` whose fast path and reference are ``forward``."""

    @dataclass
    class Config:
        pass

    info = MethodInfo(name=name, title="bench test method", arxiv=None, family=("local",), causal=True,
                      non_causal=True, cross=True, gqa=True, training_free=True, time="-", memory="-")
    return type(name, (Method,), {"__doc__": doc, "info": info, "Config": Config, "_forward": forward, "_reference": forward})


def _fail(self, q, k, v, call):
    raise RuntimeError("deliberate failure inside the method")


def _exact_up_to_64_tokens(self, q, k, v, call):
    if call.len_q > 64:
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 TB")
    return sdpa(q, k, v, causal=call.causal, scale=call.scale)


_Broken = _throwaway("bench_test_broken", _fail, "Raises on every call, like a method with a bug.")
_Hungry = _throwaway("bench_test_hungry", _exact_up_to_64_tokens, "Exact attention that runs out of memory above 64 tokens.")


@pytest.fixture
def test_methods():
    """Register the throwaway methods; unregister them after the test."""
    classes = (_Broken, _Hungry)
    for cls in classes:
        register(cls)
    yield [cls.info.name for cls in classes]
    for cls in classes:
        METHODS.unregister(cls.info.name)
