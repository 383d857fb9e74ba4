"""Throwaway methods for the bench tests, registered for one test and removed after it."""

from dataclasses import dataclass

import pytest

from attnzoo.kernels.dense import sdpa
from attnzoo.method import Method, MethodInfo
from attnzoo.registry import _REGISTRY, register


def _info(name: str) -> MethodInfo:
    return MethodInfo(name=name, title="bench test method", arxiv=None, family=("local",), causal=True,
                      non_causal=True, cross=True, gqa=True, training_free=True, time="-", memory="-")


class _Broken(Method):
    """Raises on every call, like a method with a bug."""

    info = _info("bench_test_broken")

    @dataclass
    class Config:
        pass

    def _forward(self, q, k, v, call):
        raise RuntimeError("deliberate failure inside the method")

    _reference = _forward


class _Hungry(Method):
    """Exact attention that runs out of memory above 64 tokens."""

    info = _info("bench_test_hungry")

    @dataclass
    class Config:
        pass

    def _forward(self, q, k, v, call):
        if call.len_q > 64:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 TB")
        return sdpa(q, k, v, causal=call.causal, scale=call.scale)

    _reference = _forward


@pytest.fixture
def test_methods():
    """Register the throwaway methods; unregister them after the test."""
    classes = (_Broken, _Hungry)
    for cls in classes:
        register(cls)
    yield [cls.info.name for cls in classes]
    for cls in classes:
        _REGISTRY.pop(cls.info.name, None)
