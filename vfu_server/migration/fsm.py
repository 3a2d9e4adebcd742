"""VFIO migration device-state machines (v2 and the legacy v1 bits), sans-IO.

v2 (Linux 5.18 uAPI, vfio-user ``MIG_DEVICE_STATE``) is a Mealy machine: the
device does its work on *arcs*.  The user may request any supported state; the
request is decomposed into single arcs along the shortest path and the device
sees exactly those arcs, one by one.  The direct arcs (P2P ones only when P2P
is supported, PRE_COPY ones only when PRE_COPY is)::

    STOP        -> STOP_COPY | RESUMING | RUNNING_P2P
    STOP_COPY   -> STOP                  RESUMING     -> STOP
    RUNNING     -> RUNNING_P2P | PRE_COPY
    RUNNING_P2P -> RUNNING | STOP | PRE_COPY_P2P
    PRE_COPY    -> RUNNING | PRE_COPY_P2P
    PRE_COPY_P2P-> PRE_COPY | RUNNING_P2P | STOP_COPY

Without P2P support the P2P states do not exist and the kernel's table skips
over them, which yields the direct arcs RUNNING<->STOP and PRE_COPY->STOP_COPY
(exactly the arc list of the vfio-user spec).  The arc table below spells both
variants out explicitly instead of deriving them, so the table *is* the spec.

Multi-arc requests follow the kernel's rules (``vfio_mig_get_next_state``):
shortest path; a saving-group state (PRE_COPY, PRE_COPY_P2P, STOP_COPY) may only
start or end a path, or be crossed while moving within the saving session; STOP_COPY -> PRE_COPY[_P2P] is refused
even though a path exists; nothing leaves ERROR except reset.
"""

from __future__ import annotations

import enum
import errno
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import MigrationError

__all__ = [
    "SAVING_GROUP",
    "V1_TRANSITIONS",
    "MigState",
    "MigrationFeature",
    "MigrationStateMachine",
    "V1State",
    "allowed_arcs",
    "next_state",
    "supported_states",
    "transition_path",
    "v1_to_v2",
]


class MigState(enum.IntEnum):
    """``enum vfio_device_mig_state`` wire values."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigrationFeature(enum.IntFlag):
    """``VFIO_DEVICE_FEATURE_MIGRATION`` flags (u64 on the wire)."""

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


S = MigState
F = MigrationFeature

#: States that share one saving session (one data stream).
SAVING_GROUP: frozenset[MigState] = frozenset({S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY})


@dataclass(frozen=True)
class _Arc:
    src: MigState
    dst: MigState
    requires: MigrationFeature = F.STOP_COPY
    # Arcs that only exist because the P2P state between the two ends is absent.
    only_without: int = 0


# The whole v2 arc set.  Each row is one direct arc the uAPI defines; "requires"
# lists every feature both endpoints need.
_ARC_TABLE: tuple[_Arc, ...] = (
    _Arc(S.STOP, S.STOP_COPY),
    _Arc(S.STOP_COPY, S.STOP),
    _Arc(S.STOP, S.RESUMING),
    _Arc(S.RESUMING, S.STOP),
    # P2P quiescing
    _Arc(S.RUNNING, S.RUNNING_P2P, F.P2P),
    _Arc(S.RUNNING_P2P, S.RUNNING, F.P2P),
    _Arc(S.STOP, S.RUNNING_P2P, F.P2P),
    _Arc(S.RUNNING_P2P, S.STOP, F.P2P),
    # the same arcs with RUNNING_P2P collapsed away
    _Arc(S.RUNNING, S.STOP, F.STOP_COPY, F.P2P),
    _Arc(S.STOP, S.RUNNING, F.STOP_COPY, F.P2P),
    # pre-copy
    _Arc(S.RUNNING, S.PRE_COPY, F.PRE_COPY),
    _Arc(S.PRE_COPY, S.RUNNING, F.PRE_COPY),
    _Arc(S.PRE_COPY, S.PRE_COPY_P2P, F.PRE_COPY | F.P2P),
    _Arc(S.PRE_COPY_P2P, S.PRE_COPY, F.PRE_COPY | F.P2P),
    _Arc(S.RUNNING_P2P, S.PRE_COPY_P2P, F.PRE_COPY | F.P2P),
    _Arc(S.PRE_COPY_P2P, S.RUNNING_P2P, F.PRE_COPY | F.P2P),
    _Arc(S.PRE_COPY_P2P, S.STOP_COPY, F.PRE_COPY | F.P2P),
    _Arc(S.PRE_COPY, S.STOP_COPY, F.PRE_COPY, F.P2P),
)

# Requests the kernel refuses although a path exists: once the final copy has
# started, the pre-copy phase cannot be re-entered.
_FORBIDDEN_REQUESTS: frozenset[tuple[MigState, MigState]] = frozenset(
    {(S.STOP_COPY, S.PRE_COPY), (S.STOP_COPY, S.PRE_COPY_P2P)}
)


def _norm(features: int) -> MigrationFeature:
    f = MigrationFeature(features)
    if not f & F.STOP_COPY:
        raise MigrationError(errno.EINVAL, "STOP_COPY support is mandatory for migration")
    return f


def supported_states(features: int) -> frozenset[MigState]:
    """States that exist for a device with ``features`` (ERROR always exists)."""
    f = _norm(features)
    states = {S.ERROR, S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING}
    if f & F.P2P:
        states.add(S.RUNNING_P2P)
    if f & F.PRE_COPY:
        states.add(S.PRE_COPY)
    if f & F.P2P and f & F.PRE_COPY:
        states.add(S.PRE_COPY_P2P)
    return frozenset(states)


def allowed_arcs(features: int) -> frozenset[tuple[MigState, MigState]]:
    """The direct arcs for a device with ``features``."""
    f = _norm(features)
    return frozenset(
        (a.src, a.dst)
        for a in _ARC_TABLE
        if (a.requires & f) == a.requires and not (a.only_without & f)
    )


def _refuse(cur: MigState | int, new: MigState | int, why: str) -> MigrationError:
    def name(s: MigState | int) -> str:
        try:
            return MigState(s).name
        except ValueError:
            return str(int(s))

    return MigrationError(errno.EINVAL, f"migration state {name(cur)} -> {name(new)}: {why}")


def transition_path(cur: int, new: int, features: int) -> list[MigState]:
    """The states visited going from ``cur`` to ``new``, excluding ``cur``.

    An empty list means ``cur == new``.  Raises :class:`MigrationError` (EINVAL)
    for anything the kernel would refuse.
    """
    states = supported_states(features)
    try:
        cur_s, new_s = MigState(cur), MigState(new)
    except ValueError:
        raise _refuse(cur, new, "no such state") from None
    if cur_s not in states or new_s not in states:
        raise _refuse(cur, new, "state not supported by this device")
    if cur_s is S.ERROR:
        raise _refuse(cur, new, "device is in ERROR, only a reset leaves it")
    if new_s is S.ERROR:
        raise _refuse(cur, new, "ERROR cannot be requested")
    if cur_s == new_s:
        return []
    if (cur_s, new_s) in _FORBIDDEN_REQUESTS:
        raise _refuse(cur, new, "pre-copy cannot be re-entered once stop-copy started")

    arcs = allowed_arcs(features)
    succ: dict[MigState, list[MigState]] = {}
    for a, b in sorted(arcs):
        succ.setdefault(a, []).append(b)
    # BFS.  A saving-group state may be crossed only while moving *within* the
    # saving session (e.g. PRE_COPY -> PRE_COPY_P2P -> STOP_COPY); otherwise it
    # is terminal, because entering it would start or end a session mid-path.
    within_session = cur_s in SAVING_GROUP and new_s in SAVING_GROUP
    prev: dict[MigState, MigState] = {cur_s: cur_s}
    queue = deque([cur_s])
    while queue:
        s = queue.popleft()
        if s == new_s:
            break
        if s in SAVING_GROUP and s != cur_s and not within_session:
            continue
        for t in succ.get(s, ()):
            if t not in prev:
                prev[t] = s
                queue.append(t)
    if new_s not in prev:
        raise _refuse(cur, new, "no path")
    path = [new_s]
    while prev[path[-1]] != cur_s:
        path.append(prev[path[-1]])
    return path[::-1]


def next_state(cur: int, new: int, features: int) -> MigState:
    """The first hop from ``cur`` towards ``new`` (the kernel's ``vfio_mig_get_next_state``)."""
    path = transition_path(cur, new, features)
    return path[0] if path else MigState(cur)


ArcCallback = Callable[[MigState, MigState], Any]


class MigrationStateMachine:
    """Walks requests arc by arc, calling ``on_arc(src, dst)`` for each single arc.

    Failure semantics:

    * ``on_arc`` raises :class:`MigrationError` -> the arc did not happen and the
      device vouches it is still in ``src``: the machine stays there and the
      error propagates (the reply to the SET carries its errno).
    * ``on_arc`` raises anything else -> the device state is unknown: the
      machine goes to ERROR and raises ``MigrationError(EIO)`` chained to the
      original.  Only :meth:`reset` leaves ERROR.

    Requests made while another one is being walked (re-entrancy from the
    callback) are refused with EBUSY.
    """

    def __init__(
        self,
        features: int = F.STOP_COPY | F.PRE_COPY,
        on_arc: ArcCallback | None = None,
        initial: MigState = S.RUNNING,
    ) -> None:
        self.features = _norm(features)
        self.on_arc: ArcCallback = on_arc or (lambda src, dst: None)
        if initial not in supported_states(self.features) or initial is S.ERROR:
            raise MigrationError(errno.EINVAL, f"bad initial migration state {initial!r}")
        self._state = MigState(initial)
        self._busy = False
        #: Arcs taken, oldest first, for tracing and tests.
        self.history: list[tuple[MigState, MigState]] = []

    @property
    def state(self) -> MigState:
        return self._state

    def path(self, target: int) -> list[MigState]:
        """Plan a request without performing it."""
        return transition_path(self._state, target, self.features)

    def request(self, target: int) -> MigState:
        """Move to ``target`` (``MIG_DEVICE_STATE`` SET); returns the final state."""
        if self._busy:
            raise MigrationError(errno.EBUSY, "migration state change already in progress")
        steps = self.path(target)
        self._busy = True
        try:
            for dst in steps:
                src = self._state
                try:
                    self.on_arc(src, dst)
                except MigrationError:
                    raise
                except Exception as exc:
                    self._state = S.ERROR
                    self.history.append((src, S.ERROR))
                    raise MigrationError(
                        errno.EIO, f"arc {src.name} -> {dst.name} failed: {exc!r}"
                    ) from exc
                self._state = dst
                self.history.append((src, dst))
        finally:
            self._busy = False
        return self._state

    def fail(self) -> None:
        """Force ERROR (the device found its state unrecoverable outside an arc)."""
        self._state = S.ERROR

    def reset(self, state: MigState = S.RUNNING) -> None:
        """Device reset: the only way out of ERROR.  No arc callback is made."""
        self._state = MigState(state)


# --------------------------------------------------------------------------- v1
class V1State(enum.IntFlag):
    """Legacy v1 ``device_state`` bits (migration region offset 0)."""

    STOP = 0
    RUNNING = 1 << 0
    SAVING = 1 << 1
    RESUMING = 1 << 2


#: SAVING|RESUMING is how v1 spells ERROR; 101 and 111 are invalid.
V1_ERROR = int(V1State.SAVING | V1State.RESUMING)
V1_DEVICE_STATE_MASK = 0x7

_V1_VALUE_TO_V2: dict[int, MigState] = {
    0b000: S.STOP,
    0b001: S.RUNNING,
    0b010: S.STOP_COPY,
    0b011: S.PRE_COPY,
    0b100: S.RESUMING,
}
_V2_TO_V1_VALUE: dict[MigState, int] = {v: k for k, v in _V1_VALUE_TO_V2.items()}
_V2_TO_V1_VALUE[S.ERROR] = V1_ERROR

#: The vfio-user v1 transition table (from -> allowed targets), v1 bit values.
V1_TRANSITIONS: dict[int, frozenset[int]] = {
    0b000: frozenset({0b001}),
    0b001: frozenset({0b000, 0b010, 0b011, 0b100}),
    0b010: frozenset({0b000, 0b001}),
    0b011: frozenset({0b010}),
    0b100: frozenset({0b001}),
}


def v1_to_v2(value: int) -> MigState:
    """Map a v1 ``device_state`` value (low 3 bits) to the v2 state it means."""
    v = value & V1_DEVICE_STATE_MASK
    if v == V1_ERROR:
        return S.ERROR
    try:
        return _V1_VALUE_TO_V2[v]
    except KeyError:
        raise MigrationError(errno.EINVAL, f"invalid v1 device_state {v:#05b}") from None


def v2_to_v1(state: MigState) -> int:
    return _V2_TO_V1_VALUE[MigState(state)]


def v1_check_transition(cur: int, new: int) -> None:
    """Raise EINVAL unless the v1 table allows ``cur -> new`` (low 3 bits)."""
    c, n = cur & V1_DEVICE_STATE_MASK, new & V1_DEVICE_STATE_MASK
    if c == n:
        return
    if n not in V1_TRANSITIONS.get(c, frozenset()):
        raise MigrationError(errno.EINVAL, f"v1 device_state {c:#05b} -> {n:#05b} not allowed")

