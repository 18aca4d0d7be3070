"""Transport keypairs: one session's send and receive keys, counters and replay window."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .crypto import ChaCha20Poly1305
from .replay import ReplayWindow

if TYPE_CHECKING:
    from .peer import Peer


class Keypair:
    """A session. ``local_index`` is the index the peer puts in messages to us."""

    __slots__ = (
        "created",
        "is_initiator",
        "local_index",
        "peer",
        "receive",
        "remote_index",
        "replay",
        "send",
        "send_counter",
    )

    def __init__(
        self,
        peer: Peer,
        send_key: bytes,
        receive_key: bytes,
        *,
        is_initiator: bool,
        local_index: int,
        remote_index: int,
        created: float,
    ) -> None:
        self.peer = peer
        self.send: ChaCha20Poly1305 | None = ChaCha20Poly1305(send_key)
        self.receive: ChaCha20Poly1305 | None = ChaCha20Poly1305(receive_key)
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.is_initiator = is_initiator
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created

    def zero(self) -> None:
        """Drop the key material (Python cannot scrub memory; this drops our references)."""
        self.send = None
        self.receive = None
