"""Backend names and executor dispatch, shared by the executor families (block-sparse, linear).

A *backend* is what a caller asks for, an *executor* the kernel that runs. One vocabulary of
backend names for every family:

* ``auto``: the family's documented order for the device (see each family's ``auto_order``);
* ``torch``: the PyTorch executors, on any device;
* ``flex``: FlexAttention (block-sparse);
* ``triton``: Triton kernels (linear);
* ``naive``: dense references that materialise the N x N mask (tests and small inputs).

Each family accepts the backends of its executors (:attr:`Dispatcher.accepted`), plus aliases that
keep older names working (``gather`` means ``torch`` for block-sparse). An executor says whether
it can run a call with ``can_run(...) -> None`` (it can) or a reason (it cannot); the checks are
O(1) Python on shapes and layout attributes, never a tensor reduction or a host sync. ``auto``
runs the first executor of its order that can run; an explicit backend runs the first of its
executors (table order) that can; when none can, :class:`~attnzoo.errors.UnsupportedError` lists
every executor's reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidArgumentError, UnsupportedError

BACKEND_NAMES = ("auto", "torch", "flex", "triton", "naive")


@dataclass(frozen=True)
class Executor:
    """One kernel of a family: its ``name`` (reported as the executor that ran), the ``backend``
    it belongs to, ``can_run`` (None, or why it cannot run these arguments) and ``run``."""

    name: str
    backend: str
    can_run: Callable[..., str | None] = field(repr=False)
    run: Callable[..., Any] = field(repr=False)


class Dispatcher:
    """A family's executor table. ``auto_order(device)`` lists the executors ``auto`` tries, in
    order; ``aliases`` maps accepted older names to backend names."""

    def __init__(self, family: str, executors: Sequence[Executor],
                 auto_order: Callable[[torch.device], Sequence[Executor]], aliases: Mapping[str, str] | None = None):
        self.family = family
        self.executors = tuple(executors)
        self.auto_order = auto_order
        self.aliases = dict(aliases or {})
        own = {e.backend for e in self.executors}
        self.accepted = tuple(b for b in BACKEND_NAMES if b == "auto" or b in own) + tuple(self.aliases)

    def canonical(self, requested: str) -> str:
        """An accepted name -> its backend name (aliases resolved; ``auto`` stays ``auto``)."""
        if requested not in self.accepted:
            raise InvalidArgumentError("backend", f"one of {self.accepted} for {self.family} attention", repr(requested))
        return self.aliases.get(requested, requested)

    def resolve(self, requested: str, device: torch.device) -> str:
        """The backend a call on ``device`` runs: ``auto`` -> the backend of its first executor."""
        backend = self.canonical(requested)
        return self.auto_order(device)[0].backend if backend == "auto" else backend

    def choose(self, requested: str, *args) -> Executor:
        """The executor that runs ``args`` (the ``can_run`` arguments, the query tensor first: its
        device picks the ``auto`` order)."""
        backend = self.canonical(requested)
        candidates = self.auto_order(args[0].device) if backend == "auto" else [e for e in self.executors if e.backend == backend]
        for executor in candidates:
            if executor.can_run(*args) is None:
                return executor
        reasons = "; ".join(f"{e.name} ({e.backend}): {e.can_run(*args) or 'can run'}" for e in self.executors)
        tried = ", ".join(e.name for e in candidates)
        raise UnsupportedError(f"backend: {requested!r} ({tried}) cannot run this {self.family} call on "
                               f"{args[0].device.type}; executors: {reasons}")
