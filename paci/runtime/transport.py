"""How activations and gradients travel between stages. Only this module touches torch.distributed P2P.

A transport moves one tensor per `Message` (kind, destination stage, micro-batch). The receiver
gets a fresh leaf tensor, never a view of the sender's graph, whichever transport carries it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from paci.ir import Message


class Transport(Protocol):
    def send(self, msg: Message, tensor: torch.Tensor) -> None: ...

    def recv(self, msg: Message) -> torch.Tensor: ...

    def ready(self, msg: Message) -> bool:
        """Would `recv(msg)` return without waiting?"""
        ...


class LocalTransport:
    """All stages in one process: a mailbox. Sends copy, as a wire would."""

    def __init__(self) -> None:
        self._mailbox: dict[Message, torch.Tensor] = {}

    def send(self, msg: Message, tensor: torch.Tensor) -> None:
        if msg in self._mailbox:
            raise RuntimeError(f"message {msg} sent twice before it was received")
        self._mailbox[msg] = tensor.detach().clone()

    def recv(self, msg: Message) -> torch.Tensor:
        try:
            return self._mailbox.pop(msg)
        except KeyError:
            raise RuntimeError(f"{msg} was never sent: a local run cannot wait for it") from None

    def ready(self, msg: Message) -> bool:
        return msg in self._mailbox
