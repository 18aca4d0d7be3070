"""Each uplink's NAT mapping behaviour (as ``tailscale netcheck``), sans-I/O.

The map reports the reflexive address it sees for each uplink's Register. When it also listens
on a secondary port (it says which in its Registered), the uplink sends one more Register
there, which registers nothing and is answered with the reflexive address seen on that port:

* the same address: ``endpoint-independent`` mapping (a "cone": the port the map sees is the
  port a peer will see, so a peer can punch straight to it);
* another port: ``address-dependent`` mapping (a "symmetric" NAT: each destination gets its own
  public port, so the port the map reports is no use to a peer);
* no answer after :data:`CHECK_TRIES` tries, or a map without a secondary port: ``unknown``.

The check runs again whenever the uplink's reflexive address changes (a NAT rebinding, another
network). :class:`MappingCheck` owns no socket and reads no clock: the gateway passes ``now``,
sends what :meth:`MappingCheck.due` returns and feeds the answers back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Address = tuple[str, int]
NatMapping = Literal["endpoint-independent", "address-dependent", "unknown"]

#: tries of the secondary-port Register before the mapping is reported ``unknown``
CHECK_TRIES = 3
#: seconds between tries
CHECK_RETRY = 1.0


@dataclass(slots=True)
class _Uplink:
    primary: Address | None = None
    secondary_port: int | None = None
    mapping: NatMapping = "unknown"
    #: the next try is due at this time (None: nothing to send)
    due_at: float | None = None
    tries: int = 0


@dataclass(frozen=True, slots=True)
class MappingLearned:
    """``nat.mapping``: an uplink's mapping behaviour was learned (or changed)."""

    uplink: str
    mapping: NatMapping
    primary: Address
    secondary: Address | None


class MappingCheck:
    """Per uplink: the reflexive address seen on the map's port and on its secondary port."""

    def __init__(self, *, tries: int = CHECK_TRIES, retry: float = CHECK_RETRY) -> None:
        self.tries = tries
        self.retry = retry
        self._uplinks: dict[str, _Uplink] = {}
        self._events: list[MappingLearned] = []

    def mapping(self, uplink: str) -> NatMapping:
        state = self._uplinks.get(uplink)
        return "unknown" if state is None else state.mapping

    def mappings(self) -> dict[str, NatMapping]:
        return {name: state.mapping for name, state in self._uplinks.items()}

    def uplink_mappings(self) -> list[tuple[str, Address, NatMapping]]:
        """Each registered uplink, its reflexive address (on the map's port) and mapping."""
        return [(name, s.primary, s.mapping) for name, s in self._uplinks.items() if s.primary]

    def reflexive_mappings(self) -> list[tuple[Address, NatMapping]]:
        """Each registered uplink's reflexive address (on the map's port) and mapping."""
        return [(s.primary, s.mapping) for s in self._uplinks.values() if s.primary is not None]

    def registered(
        self, uplink: str, reflexive: Address, secondary_port: int | None, now: float
    ) -> None:
        """The map registered ``uplink`` and saw it at ``reflexive`` (``secondary_port``: the
        map's, from its Registered): a new or changed address is checked again."""
        state = self._uplinks.setdefault(uplink, _Uplink())
        if state.primary == reflexive and state.secondary_port == secondary_port:
            return
        state.primary, state.secondary_port = reflexive, secondary_port
        state.mapping = "unknown"
        state.tries = 0
        state.due_at = None if secondary_port is None else now

    def answered(self, uplink: str, reflexive: Address, now: float) -> None:
        """The secondary port saw ``uplink`` at ``reflexive``."""
        state = self._uplinks.get(uplink)
        if state is None or state.primary is None or state.tries == 0:
            return  # not asked (a late answer from before a change, or hostile)
        mapping: NatMapping = (
            "endpoint-independent" if reflexive == state.primary else "address-dependent"
        )
        state.due_at = None
        if mapping != state.mapping:
            state.mapping = mapping
            self._events.append(MappingLearned(uplink, mapping, state.primary, reflexive))

    def remove_uplink(self, uplink: str) -> None:
        self._uplinks.pop(uplink, None)

    def next_deadline(self) -> float | None:
        deadlines = [s.due_at for s in self._uplinks.values() if s.due_at is not None]
        return min(deadlines) if deadlines else None

    def due(self, now: float) -> list[tuple[str, int]]:
        """``(uplink, secondary port)``: send a Register from ``uplink`` to the map's address
        on that port now."""
        out: list[tuple[str, int]] = []
        for name, state in self._uplinks.items():
            if state.due_at is None or state.due_at > now or state.secondary_port is None:
                continue
            if state.tries >= self.tries:
                state.due_at = None
                if state.primary is not None:
                    self._events.append(MappingLearned(name, "unknown", state.primary, None))
                continue
            state.tries += 1
            state.due_at = now + self.retry
            out.append((name, state.secondary_port))
        return out

    def pop_events(self) -> list[MappingLearned]:
        out, self._events = self._events, []
        return out
