"""Point-to-point exchange between ranks, differentiable and counted.

Every byte the distributed forms move goes through :func:`exchange` (``batch_isend_irecv``), whose
backward sends each received tensor's gradient back to its sender; :func:`counting` reads the bytes
this process sent, as counted from the tensors handed to the backend (not estimated).
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import InvalidArgumentError


@dataclass
class Traffic:
    """Bytes this process sent (``sent``) and point-to-point messages (``messages``) while counting."""

    sent: int = 0
    messages: int = 0


_ACTIVE: list[Traffic] = []


@contextlib.contextmanager
def counting():
    """``with counting() as traffic:`` counts the bytes this rank sends inside the block (forward and
    backward exchanges alike)."""
    traffic = Traffic()
    _ACTIVE.append(traffic)
    try:
        yield traffic
    finally:
        _ACTIVE.remove(traffic)


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now (for ``init_method="tcp://127.0.0.1:PORT"`` of spawned ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Group:
    """A process group as the exchanges see it: ``rank`` and ``size`` inside it, and the global
    rank of each member (the ids ``isend``/``irecv`` take)."""

    handle: object
    rank: int
    size: int
    members: tuple[int, ...]


def resolve_group(group) -> Group:
    """``group`` (None: the default group) -> :class:`Group`; raises when torch.distributed is not up."""
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError("group", "an initialised torch.distributed process group (call "
                                   "torch.distributed.init_process_group first)", "no process group")
    handle = dist.group.WORLD if group is None else group
    size = dist.get_world_size(handle)
    members = tuple(dist.get_global_rank(handle, r) for r in range(size)) if group is not None else tuple(range(size))
    return Group(handle, dist.get_rank(handle), size, members)


@dataclass
class Pending:
    """Requests of an exchange started with ``wait=False``: call :meth:`wait` before reading its results."""

    requests: list = field(default_factory=list)
    keep: list = field(default_factory=list)  # the tensors being sent stay alive until the wait

    def wait(self) -> None:
        for request in self.requests:
            request.wait()
        self.requests.clear()
        self.keep.clear()


def _post(group: Group, sends, receives, pending: Pending) -> list[torch.Tensor]:
    """Start the sends ((peer, tensor)) and receives ((peer, shape, dtype, device)); peers are
    ranks inside ``group``; returns the receive buffers (valid after ``pending.wait()``)."""
    ops, buffers = [], []
    for peer, tensor in sends:
        tensor = tensor.contiguous()
        pending.keep.append(tensor)
        ops.append(dist.P2POp(dist.isend, tensor, group.members[peer], group.handle))
        for traffic in _ACTIVE:
            traffic.sent += tensor.numel() * tensor.element_size()
            traffic.messages += 1
    for peer, shape, dtype, device in receives:
        buffer = torch.empty(shape, dtype=dtype, device=device)
        buffers.append(buffer)
        ops.append(dist.P2POp(dist.irecv, buffer, group.members[peer], group.handle))
    if ops:
        pending.requests.extend(dist.batch_isend_irecv(ops))
    return buffers


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, anchor, *tensors):
        group, send_peers, receives, pending = spec
        ctx.group, ctx.send_peers, ctx.receives = group, send_peers, receives
        ctx.sent = [(t.shape, t.dtype, t.device) for t in tensors]
        own = pending if pending is not None else Pending()
        buffers = _post(group, list(zip(send_peers, tensors)), receives, own)
        if pending is None:
            own.wait()
        return tuple(buffers) if buffers else (torch.empty(0, device=anchor.device),)

    @staticmethod
    def backward(ctx, *grads):
        grads = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                 for g, (_, shape, dtype, device) in zip(grads, ctx.receives)]
        back = [(peer, shape, dtype, device) for peer, (shape, dtype, device) in zip(ctx.send_peers, ctx.sent)]
        pending = Pending()
        results = _post(ctx.group, [(peer, g) for (peer, *_), g in zip(ctx.receives, grads)], back, pending)
        pending.wait()
        return (None, None, *results)


def exchange(group: Group, sends, receives, *, anchor: torch.Tensor, pending: Pending | None = None) -> list[torch.Tensor]:
    """Send each (peer, tensor) of ``sends`` and receive each (peer, shape, dtype, device) of
    ``receives`` (peers: ranks in ``group``), in one ``batch_isend_irecv``; returns the received
    tensors in order. Differentiable: the backward returns every received tensor's gradient to its
    sender; ``anchor`` is a local tensor the exchange stands beside in the graph (e.g. this rank's k):
    when it needs gradients, so do the received tensors, even on a rank that sends nothing. With ``pending`` the call returns at once (communication overlaps what follows) and the
    results are valid after ``pending.wait()``; every rank must post matching exchanges in the same
    order. Every result must reach the loss for the backward to run on every rank (see
    :func:`attach`); with nothing to receive, the list holds one empty receipt to keep in the graph
    for the same reason."""
    if not sends and not receives:
        return []
    spec = (group, tuple(p for p, _ in sends), tuple(receives), pending)
    return list(_Exchange.apply(spec, anchor, *[t for _, t in sends]))


def all_gather(group: Group, t: torch.Tensor, sizes: list[int] | None = None) -> list[torch.Tensor]:
    """Every rank's ``t`` in rank order, differentiable: the same shape on every rank, or rank p's
    with ``sizes[p]`` entries along axis 2 (tokens or blocks of (B, H, n, D))."""
    others = [p for p in range(group.size) if p != group.rank]
    shape = lambda p: t.shape if sizes is None else (*t.shape[:2], sizes[p], *t.shape[3:])  # noqa: E731
    got = iter(exchange(group, [(p, t) for p in others], [(p, shape(p), t.dtype, t.device) for p in others], anchor=t))
    return [t if p == group.rank else next(got) for p in range(group.size)]


def gather_ints(group: Group, values: list[int], device) -> torch.Tensor:
    """Every rank's list of ``len(values)`` ints -> a (size, len(values)) int64 tensor (one small
    all-gather; the shapes every exchange is sized by)."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(group.size)]
    dist.all_gather(out, mine, group=group.handle)
    return torch.stack(out).cpu()


class _Attach(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, *unused):
        ctx.unused = [(t.shape, t.dtype, t.device) for t in unused]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.unused])


def attach(out: torch.Tensor, unused: list[torch.Tensor]) -> torch.Tensor:
    """``out``, with the received tensors ``unused`` (which it does not depend on) tied into its
    graph with zero gradient: the backward of every exchange then runs on every rank, so the
    peers waiting for its (zero) gradients are answered."""
    unused = [t for t in unused if t.requires_grad]
    return _Attach.apply(out, *unused) if unused and torch.is_grad_enabled() else out
