"""How activations and gradients travel between stages: all of torch.distributed's point to point
(collectives and process groups: paci.runtime.mesh).

A transport moves one payload per `Message` (kind, destination stage, micro-batch): a tensor, or
a tuple, list or dict of them (paci.runtime.payload). The receiver gets fresh leaf tensors, never
views of the sender's graph, whichever transport carries them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from paci.ir import Message, Schedule, sends
from paci.runtime.payload import Layout, Payload, apply, leaves, rebuild


class Transport(Protocol):
    def send(self, msg: Message, data: Payload) -> None: ...

    def recv(self, msg: Message) -> Payload: ...

    def ready(self, msg: Message) -> bool:
        """Would `recv(msg)` return without waiting? Only the in-process driver (`run_local`) asks;
        DistTransport has no answer (gloo cannot poll), its ranks simply block in `recv`."""
        ...


class LocalTransport:
    """All stages in one process: a mailbox. Sends copy, as a wire would."""

    def __init__(self) -> None:
        self._mailbox: dict[Message, Payload] = {}

    def send(self, msg: Message, data: Payload) -> None:
        if msg in self._mailbox:
            raise RuntimeError(f"message {msg} sent twice before it was received")
        self._mailbox[msg] = apply(data, lambda t: t.detach().clone())

    def recv(self, msg: Message) -> Payload:
        try:
            return self._mailbox.pop(msg)
        except KeyError:
            raise RuntimeError(f"{msg} was never sent: a local run cannot wait for it") from None

    def ready(self, msg: Message) -> bool:
        return msg in self._mailbox


# ----------------------------------------------------------------------------------------------
# torch.distributed point-to-point


class PeerFailure(RuntimeError):
    """A neighbour rank died, hung past the timeout, or sent something unexpected."""


# msg -> its payload's Layout, or (shape, dtype) where it is one tensor
MessageSpec = Callable[[Message], Layout | tuple[tuple[int, ...], torch.dtype]]
MAX_LEAVES = 16  # tensors in one message: each travels with a tag of its own


class DistTransport:
    """isend/irecv between neighbouring ranks, every handle waited with a timeout.

    Rank r holds stage r, or with an interleaved schedule every stage s with s % P = r, so its
    peers are the ranks of its stages' neighbours (a ring when stages loop through the ranks).
    Receives are posted ahead, in the order the *sender* sends them: this rank walks its
    peers' action streams (the schedule is static), so the posting order matches the peer's
    send order even where two message kinds interleave differently on the two sides. That keeps
    NCCL, which matches by order, correct; gloo additionally matches by tag. Buffers are sized
    from `spec`, known up front, so no shape travels with a message.
    """

    def __init__(self, schedule: Schedule, rank: int, spec: MessageSpec, device: torch.device,
                 timeout_s: float = 45.0, group=None, offset: int = 0) -> None:
        """`rank` is this rank's place in its pipeline; the pipeline's rank p is global rank
        `offset` + p (data parallel: one pipeline per replica, each over consecutive ranks)."""
        self.rank, self.num_stages, self.ranks, self.offset = rank, schedule.num_stages, schedule.ranks, offset
        self.chunks = schedule.stages_per_rank
        self.spec, self.device, self.group = spec, device, group
        self.timeout = timedelta(seconds=timeout_s)
        # Receives posted ahead per peer, and sends kept in flight before the oldest is waited. A
        # stage is at most (its rank's stages) x P forwards ahead of its neighbour, so these bounds
        # never throttle 1F1B.
        self.depth = schedule.num_stages + 1
        self.max_sends = 2 * schedule.num_stages + 8
        peers = sorted({neighbour % self.ranks for s in schedule.stages_of(rank) for neighbour in (s - 1, s + 1)
                        if 0 <= neighbour < self.num_stages} - {rank})
        self._incoming = {peer: self._sent_to_me(schedule, peer) for peer in peers}
        self._posted: dict[Message, tuple[list[dist.Work], Payload]] = {}
        self._outstanding = dict.fromkeys(self._incoming, 0)
        self._sending: list[tuple[list[dist.Work], list[torch.Tensor], Message]] = []
        for peer in self._incoming:
            self._top_up(peer)

    def _sent_to_me(self, schedule: Schedule, peer: int) -> Iterator[Message]:
        for action in schedule.rank_actions(peer):
            msg = sends(action, self.num_stages)
            if msg is not None and msg.dst % self.ranks == self.rank:
                yield msg

    def _top_up(self, peer: int, until: Message | None = None) -> None:
        """Post receives from `peer` until `depth` are outstanding (and `until` is among them)."""
        while self._outstanding[peer] < self.depth or (until is not None and until not in self._posted):
            msg = next(self._incoming[peer], None)
            if msg is None:
                return
            spec = self.spec(msg)
            spec = spec if isinstance(spec, Layout) else Layout.single(*spec)
            buffers = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in spec.leaves]
            works = [dist.irecv(buffer, src=self.offset + peer, group=self.group, tag=self._tag(msg, i))
                     for i, buffer in enumerate(buffers)]
            self._posted[msg] = (works, rebuild(spec, buffers))
            self._outstanding[peer] += 1

    def recv(self, msg: Message) -> torch.Tensor:
        peer = _source(msg) % self.ranks
        if msg not in self._posted:
            self._top_up(peer, until=msg)
            if msg not in self._posted:
                raise PeerFailure(f"rank {self.rank}: {msg} is not in rank {peer}'s schedule")
        works, data = self._posted.pop(msg)
        self._outstanding[peer] -= 1
        for work in works:
            self._wait(work, f"receiving {msg.kind} of micro-batch {msg.microbatch} from rank {peer}")
        self._top_up(peer)
        return data

    def send(self, msg: Message, data: Payload) -> None:
        tensors = [tensor.detach().contiguous() for tensor in leaves(data)]  # they must outlive the send
        works = [dist.isend(tensor, dst=self.offset + msg.dst % self.ranks, group=self.group, tag=self._tag(msg, i))
                 for i, tensor in enumerate(tensors)]
        self._sending.append((works, tensors, msg))
        if len(self._sending) > self.max_sends:  # gloo never reports completion by itself: bound the list
            self._wait_sent(*self._sending.pop(0))

    def flush(self) -> None:
        """Wait for every send still in flight."""
        for sending in self._sending:
            self._wait_sent(*sending)
        self._sending = []

    def _wait_sent(self, works: list[dist.Work], tensors: list[torch.Tensor], msg: Message) -> None:
        for work in works:
            self._wait(work, f"sending {msg.kind} of micro-batch {msg.microbatch} to rank {msg.dst % self.ranks}")

    def _wait(self, work: dist.Work, what: str) -> None:
        start = time.monotonic()
        try:
            work.wait(self.timeout)
        except RuntimeError as exc:
            waited = time.monotonic() - start
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PeerFailure(f"rank {self.rank}: {what} failed after {waited:.0f} s ({reason}); "
                              "that rank died or hung") from None

    def _tag(self, msg: Message, leaf: int = 0) -> int:
        """Unique between two ranks among messages in flight: kind, micro-batch, which of the
        receiver's stages, and which tensor of the payload."""
        index = (msg.microbatch * len(_KINDS) + _KINDS[msg.kind]) * self.chunks + msg.dst // self.ranks
        return index * MAX_LEAVES + leaf


def _source(msg: Message) -> int:
    return msg.dst + 1 if msg.kind == "B" else msg.dst - 1


_KINDS = {"F": 0, "B": 1, "E": 2}


STATS_WIDTH = 6  # the fields of a metrics.StatsEvent


class StatsChannel:
    """Small float64 tuples of `width` fields from rank `src` to rank `dst` (or to each of several),
    in send order: `StatsEvent`s from the last rank to rank 0 (step losses, validation losses),
    gradient norms, a prompt stop's decision per step from rank 0 to every rank.

    Off the critical path: the sender sends without waiting, and a receiver asks only for what the
    schedule guarantees has been sent already, or is about to be (see `receive`), so neither ever
    stalls the other. It has its own process group, so it never interleaves with activations on
    an NCCL pair. (gloo's Work.is_completed() stays False until wait() is called, so polling is no
    option.)
    """

    def __init__(self, group, rank: int, src: int, dst: int | Sequence[int], count: int, device: torch.device,
                 timeout_s: float = 45.0, depth: int = 8, width: int = STATS_WIDTH) -> None:
        self.group, self.rank, self.src = group, rank, src
        self.dsts = [dst] if isinstance(dst, int) else list(dst)
        self.device, self.timeout, self.width = device, timedelta(seconds=timeout_s), width
        self._unposted = count if rank in self.dsts else 0
        self._posted: list[tuple[dist.Work, torch.Tensor]] = []
        self._sending: list[tuple[dist.Work, torch.Tensor]] = []
        self._depth = depth
        self._post()

    def _post(self) -> None:
        while self._unposted and len(self._posted) < self._depth:
            buffer = torch.empty(self.width, dtype=torch.float64, device=self.device)
            self._posted.append((dist.irecv(buffer, src=self.src, group=self.group), buffer))
            self._unposted -= 1

    def send(self, values: tuple[float, ...]) -> None:
        payload = torch.tensor(values, dtype=torch.float64, device=self.device)
        for dst in self.dsts:
            self._sending.append((dist.isend(payload, dst=dst, group=self.group), payload))
        if len(self._sending) > 2 * self._depth * len(self.dsts):  # bounded: each receiver posts `depth` ahead
            self._sending.pop(0)[0].wait(self.timeout)

    def receive(self) -> tuple[float, ...]:
        """The next tuple, in send order (blocking)."""
        if not self._posted:
            raise PeerFailure(f"rank {self.rank}: more messages requested than rank {self.src} sends")
        work, buffer = self._posted.pop(0)
        try:
            work.wait(self.timeout)
        except RuntimeError as exc:
            raise PeerFailure(f"rank {self.rank}: waiting for rank {self.src}'s message failed ({exc})") from None
        self._post()
        return tuple(buffer.tolist())

    def flush(self) -> None:
        for work, _ in self._sending:
            work.wait(self.timeout)
        self._sending = []


# ----------------------------------------------------------------------------------------------
# one-off messages: the layouts handed down the pipeline at start, rank 0's results for every rank


def send_object(value, dst: int) -> None:
    """A picklable `value` to rank `dst` (blocking; `recv_object` on the other end)."""
    dist.send_object_list([value], dst=dst)


def recv_object(src: int):
    """What rank `src` passes to `send_object` for this rank."""
    box = [None]
    dist.recv_object_list(box, src=src)
    return box[0]


def fan_out(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank 0's `tensor` into every rank's `tensor` (of the same shape), in place. Point to point on
    purpose: a collective's tensors are released by a gloo worker thread that needs the GIL, and a
    process exiting right after its last collective can abort while that thread waits for it."""
    if rank == 0:
        for peer in range(1, world):
            dist.send(tensor, dst=peer)
    else:
        dist.recv(tensor, src=0)
    return tensor
