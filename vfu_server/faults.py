"""Fault injection: rules that make a device misbehave on purpose (docs/faults.md).

A rule is a match and an action, written in a compact syntax (``--fault RULE``, the control
socket's ``fault-add``, or :meth:`FaultSet.add` from Python)::

    op=read,lba=1000,status=media/0x81,dnr       an Unrecovered Read Error on LBA 1000
    op=write,every=10,hang                        every 10th write never completes
    queue=1,prob=0.01,seed=7,delay=200            1% of queue 1's commands wait 200 ms
    op=tx,prob=0.1,drop                           10% of transmitted frames are lost

Items are separated by commas; each is ``key=value`` or a bare flag. Match keys: ``op``
(names the device declares, or numbers; several joined by ``|``), ``ns``, ``lba`` (``N`` or
``FIRST-LAST``, inclusive; a command matches when its blocks overlap), ``queue``, ``every``
(fire on every Nth command that matches the rest), ``prob`` (0..1) with ``seed``, ``count``
(fire at most N times), ``after`` and ``for`` (a time window from the rule's creation:
``500ms``, ``2s``, ``5m``, ``1h`` or seconds). Actions: ``status=S`` (with ``dnr``, ``more``), ``delay=MS``,
``hang``, ``corrupt[=BITS]``, ``torn[=BYTES]``, ``fatal``, ``reset``, ``drop``, ``dup``.

The engine is generic: a device declares a :class:`FaultDomain` (which keys and actions make
sense for it, its op names and named statuses) and asks :meth:`FaultSet.match` per command.
With no rules :attr:`FaultSet.active` is False, and that one attribute test is all a hot path
pays.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

__all__ = [
    "ACTIONS",
    "CONTROL_COMMANDS",
    "MATCH_KEYS",
    "FaultControl",
    "FaultDomain",
    "FaultError",
    "FaultSet",
    "Rule",
    "flip_bits",
    "handle_control",
    "parse_rule",
]

#: keys every rule may use, whatever the device
GENERIC_KEYS = frozenset({"every", "prob", "seed", "count", "after", "for"})
#: keys that need the device to say what they mean for it
MATCH_KEYS = frozenset({"op", "ns", "lba", "queue"})
ACTIONS = frozenset({"status", "delay", "hang", "corrupt", "torn", "fatal", "reset", "drop", "dup"})
#: actions that may carry a ``status=`` for how the command completes
_WITH_STATUS = frozenset({"corrupt", "torn"})
_FLAGS = frozenset({"dnr", "more"})
MAX_DELAY_MS = 600_000
log = logging.getLogger("vfu_server.faults")
MAX_RULES = 256


class FaultError(ValueError):
    """A rule that cannot be applied: ``errno`` and a one-line reason. Nothing was changed."""

    def __init__(self, reason: str, err: int = errno.EINVAL) -> None:
        super().__init__(reason)
        self.errno = err
        self.reason = reason


@dataclass(frozen=True)
class FaultDomain:
    """What one kind of device can match and do; declared by the device, used by the engine.

    ``ops`` names command kinds (an NVMe opcode, a virtio-blk request type, a frame
    direction). ``statuses`` names completion statuses; ``parse_status`` turns any other
    ``status=`` text into the device's value (or raises ValueError). ``flags`` are the bits
    ``dnr``/``more`` add to a status. ``fast_ops`` are the ops a device's fast path (C) handles
    without asking the engine: :meth:`FaultSet.could_match` tells it when to step aside."""

    name: str
    ops: Mapping[str, int]
    matches: frozenset[str]
    actions: frozenset[str]
    statuses: Mapping[str, int] = field(default_factory=dict)
    parse_status: Callable[[str], int] | None = None
    flags: Mapping[str, int] = field(default_factory=dict)
    fast_ops: frozenset[int] = frozenset()

    def describe(self) -> dict[str, Any]:
        return {"device": self.name, "ops": dict(self.ops), "match": sorted(self.matches | GENERIC_KEYS),
                "actions": sorted(self.actions), "statuses": dict(self.statuses), "flags": sorted(self.flags)}


@dataclass(eq=False)
class Rule:
    """One parsed rule and its counters. ``seen``: commands that met every condition but
    ``every``/``prob``; ``fired``: how many times the action was taken."""

    text: str
    action: str
    ops: frozenset[int] | None = None
    ns: int | None = None
    lba: tuple[int, int] | None = None
    queue: int | None = None
    every: int = 1
    prob: float = 1.0
    seed: int = 0
    count: int | None = None
    after: float = 0.0
    duration: float | None = None
    status: int | None = None
    delay_ms: int = 0
    bits: int = 1
    torn_bytes: int | None = None
    id: int = 0
    seen: int = 0
    fired: int = 0
    created: float = field(default_factory=time.monotonic)
    rng: random.Random = field(init=False, repr=False)
    _removed: trio.Event = field(default_factory=trio.Event, init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @property
    def spent(self) -> bool:
        return self.count is not None and self.fired >= self.count

    def in_window(self, now: float) -> bool:
        start = self.created + self.after
        return now >= start and (self.duration is None or now < start + self.duration)

    async def wait_removed(self) -> None:
        """Until the rule is removed: a ``hang`` holds its commands this long (or until the
        device resets and drops them)."""
        await self._removed.wait()

    def _mark_removed(self) -> None:
        self._removed.set()

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "rule": self.text, "action": self.action, "seen": self.seen,
                "fired": self.fired, "spent": self.spent}


def _int(key: str, value: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise FaultError(f"{key}={value}: not a number") from None
    if not lo <= n <= hi:
        raise FaultError(f"{key}={value}: must be {lo}..{hi}")
    return n


def _seconds(key: str, value: str) -> float:
    text = value.strip().lower()
    scale = 1.0
    for suffix, unit in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            text, scale = text[: -len(suffix)], unit
            break
    try:
        n = float(text) * scale
    except ValueError:
        raise FaultError(f"{key}={value}: not a duration (500ms, 2s, 5m, 1h; a bare number is seconds)") from None
    if not 0 <= n <= 86400 * 365:
        raise FaultError(f"{key}={value}: out of range")
    return n


def parse_rule(text: str, domain: FaultDomain) -> Rule:
    """Parse one rule for ``domain``; :class:`FaultError` says what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise FaultError("empty rule")
    if len(text) > 1000:
        raise FaultError("rule longer than 1000 characters")
    items: dict[str, str | None] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise FaultError(f"{text!r}: empty item")
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if key in items:
            raise FaultError(f"{key}: given twice")
        items[key] = value.strip() if eq else None
    known = MATCH_KEYS | GENERIC_KEYS | ACTIONS | _FLAGS
    for key in items:
        if key not in known:
            raise FaultError(f"unknown key {key!r} (match: {', '.join(sorted(MATCH_KEYS | GENERIC_KEYS))}; "
                             f"actions: {', '.join(sorted(ACTIONS))})")
        if key in MATCH_KEYS and key not in domain.matches:
            raise FaultError(f"{domain.name} cannot match on {key!r}", errno.ENOTSUP)
        if key in ACTIONS and key not in domain.actions:
            raise FaultError(f"{domain.name} cannot do {key!r} (it can: {', '.join(sorted(domain.actions))})",
                             errno.ENOTSUP)
        if key in _FLAGS and key not in domain.flags:
            raise FaultError(f"{domain.name} has no {key!r} bit", errno.ENOTSUP)
    actions = [k for k in items if k in ACTIONS]
    main = [k for k in actions if k != "status"] or actions
    if not actions:
        raise FaultError(f"{text!r}: no action (one of {', '.join(sorted(domain.actions))})")
    if len(main) > 1 or (len(actions) > 1 and main[0] not in _WITH_STATUS):
        raise FaultError(f"{text!r}: one action per rule ({', '.join(actions)} given)")
    rule = Rule(text=text.strip(), action=main[0], seed=_int("seed", items["seed"] or "", 0)
                if "seed" in items else 0)

    def need(key: str) -> str:
        value = items[key]
        if value is None or value == "":
            raise FaultError(f"{key}: needs a value ({key}=...)")
        return value

    if "op" in items:
        ops = set()
        for name in need("op").split("|"):
            name = name.strip().lower()
            if name in domain.ops:
                ops.add(domain.ops[name])
            else:
                try:
                    ops.add(_int("op", name, 0, 0xFFFF))
                except FaultError:
                    raise FaultError(f"op={name}: unknown (known: {', '.join(domain.ops)} or a number)") from None
        rule.ops = frozenset(ops)
    if "ns" in items:
        rule.ns = _int("ns", need("ns"), 1, 0xFFFFFFFF)
    if "lba" in items:
        first, dash, last = need("lba").partition("-")
        lo = _int("lba", first)
        hi = _int("lba", last) if dash else lo
        if hi < lo:
            raise FaultError(f"lba={items['lba']}: last below first")
        rule.lba = (lo, hi)
    if "queue" in items:
        rule.queue = _int("queue", need("queue"), 0, 0xFFFF)
    if "every" in items:
        rule.every = _int("every", need("every"), 1, 1 << 32)
    if "prob" in items:
        try:
            rule.prob = float(need("prob"))
        except ValueError:
            raise FaultError(f"prob={items['prob']}: not a number") from None
        if not 0 < rule.prob <= 1:
            raise FaultError(f"prob={items['prob']}: must be in (0, 1]")
    if "count" in items:
        rule.count = _int("count", need("count"), 1, 1 << 32)
    if "after" in items:
        rule.after = _seconds("after", need("after"))
    if "for" in items:
        rule.duration = _seconds("for", need("for"))
    if "status" in items:
        rule.status = _status(need("status"), domain)
    flag_bits = 0
    for flag in _FLAGS & items.keys():
        if items[flag] is not None:
            raise FaultError(f"{flag} is a flag, without a value")
        if "status" not in items:
            raise FaultError(f"{flag} goes with status=")
        flag_bits |= domain.flags[flag]
    if rule.status is not None:
        rule.status |= flag_bits
    if "delay" in items:
        rule.delay_ms = int(_seconds("delay", need("delay") if items["delay"] and items["delay"][-1:].isalpha()
                                     else need("delay") + "ms") * 1000)
        if not 0 < rule.delay_ms <= MAX_DELAY_MS:
            raise FaultError(f"delay={items['delay']}: must be 1..{MAX_DELAY_MS} ms")
    if "corrupt" in items:
        rule.bits = _int("corrupt", items["corrupt"], 1, 4096) if items["corrupt"] else 1
    if "torn" in items:
        rule.torn_bytes = _int("torn", items["torn"], 0, 1 << 32) if items["torn"] else None
    for flag_action in ("hang", "fatal", "reset", "drop", "dup"):
        if flag_action in items and items[flag_action] is not None:
            raise FaultError(f"{flag_action} takes no value")
    return rule


def _status(text: str, domain: FaultDomain) -> int:
    name = text.lower()
    if name in domain.statuses:
        return domain.statuses[name]
    if domain.parse_status is None:
        raise FaultError(f"status={text}: unknown (known: {', '.join(domain.statuses)})")
    try:
        return domain.parse_status(text)
    except ValueError as exc:
        raise FaultError(f"status={text}: {exc}") from None


class FaultSet:
    """The rules of one device. Not thread-safe: used from the device's event loop."""

    def __init__(self, domain: FaultDomain) -> None:
        self.domain = domain
        #: any rules at all: the one test a hot path makes
        self.active = False
        self._rules: list[Rule] = []
        self._next_id = 1
        self._could: dict[tuple[frozenset[int], int | None], bool] = {}

    def add(self, rule: str | Rule) -> Rule:
        """Parse (if text) and add a rule; returns it with its id. Raises :class:`FaultError`
        and changes nothing when the rule is bad."""
        parsed = parse_rule(rule, self.domain) if isinstance(rule, str) else rule
        if len(self._rules) >= MAX_RULES:
            raise FaultError(f"at most {MAX_RULES} rules", errno.ENOSPC)
        parsed.id = self._next_id
        self._next_id += 1
        parsed.created = time.monotonic()
        self._rules.append(parsed)
        self._changed()
        return parsed

    def remove(self, rule_id: int) -> Rule:
        """Remove a rule; commands its ``hang`` holds are released (they run normally)."""
        for i, rule in enumerate(self._rules):
            if rule.id == rule_id:
                del self._rules[i]
                self._changed()
                rule._mark_removed()
                return rule
        raise FaultError(f"no rule {rule_id}", errno.ENOENT)

    def clear(self) -> list[Rule]:
        rules, self._rules = self._rules, []
        self._changed()
        for rule in rules:
            rule._mark_removed()
        return rules

    def rules(self) -> list[Rule]:
        return list(self._rules)

    def _changed(self) -> None:
        self.active = bool(self._rules)
        self._could.clear()

    def could_match(self, ops: frozenset[int], queue: int | None = None) -> bool:
        """Whether a rule might fire for a command of one of ``ops`` on ``queue``: a fast path
        that does not call :meth:`match` steps aside while this is True. Cached until the
        rules change or one is spent; ``lba``, ``ns`` and time windows are not considered
        (that is conservative)."""
        key = (ops, queue)
        could = self._could.get(key)
        if could is None:
            could = any((r.ops is None or r.ops & ops) and (r.queue is None or queue is None or r.queue == queue)
                        and not r.spent for r in self._rules)
            self._could[key] = could
        return could

    def match(self, op: int, *, ns: int | None = None, lba: int | None = None, blocks: int = 1,
              queue: int | None = None) -> Rule | None:
        """The first rule that fires for this command (its counters updated), or None.

        A rule with ``lba`` matches only commands that have blocks (``lba`` given) and
        overlap its range; ``ns`` and ``queue`` likewise only commands that have them."""
        now = 0.0
        for rule in self._rules:
            if rule.ops is not None and op not in rule.ops:
                continue
            if rule.ns is not None and ns != rule.ns:
                continue
            if rule.queue is not None and queue != rule.queue:
                continue
            if rule.lba is not None and (lba is None or lba > rule.lba[1] or lba + max(blocks, 1) - 1 < rule.lba[0]):
                continue
            if rule.spent:
                continue
            if rule.after or rule.duration is not None:
                now = now or time.monotonic()
                if not rule.in_window(now):
                    continue
            rule.seen += 1
            if rule.seen % rule.every:
                continue
            if rule.prob < 1 and rule.rng.random() >= rule.prob:
                continue
            rule.fired += 1
            if rule.spent:
                self._could.clear()  # fast paths may take its commands back
            return rule
        return None

    def describe(self) -> dict[str, Any]:
        return {"rules": [r.as_dict() for r in self._rules], "domain": self.domain.describe()}


def flip_bits(views: list[memoryview], bits: int, rng: random.Random) -> list[int]:
    """Flip ``bits`` distinct bits at random positions of the concatenated ``views`` (in
    place); returns the bit positions. Nothing is flipped in an empty buffer."""
    total = sum(v.nbytes for v in views) * 8
    if total == 0:
        return []
    positions = sorted(rng.sample(range(total), min(bits, total)))
    base, it = 0, iter(views)
    view = next(it)
    for pos in positions:
        byte = pos // 8
        while byte >= base + view.nbytes:
            base += view.nbytes
            view = next(it)
        view[byte - base] ^= 1 << (pos % 8)
    return positions


# -- the control socket ----------------------------------------------------------------------

#: control commands handled here (``vfu_server.server.serve_control`` asks first)
CONTROL_COMMANDS = frozenset({"fault-add", "fault-list", "fault-remove", "fault-counters", "power-cut"})


def _error(err: int, reason: str) -> dict[str, Any]:
    return {"ok": False, "errno": err, "error": errno.errorcode.get(err, str(err)), "reason": reason}


async def handle_control(device: Any, msg: dict[str, Any]) -> dict[str, Any]:
    """One fault or power-cut command of the control socket (JSON object in, JSON object out).
    Never raises: a bad request is an ``ok: false`` reply with an errno and a reason.
    ``device``: the :class:`~vfu_server.pci.device.PciDevice`, or the server's
    :class:`~vfu_server.pci.endpoint.Endpoint` around it (``Server.device``)."""
    from .pci.endpoint import Endpoint

    if isinstance(device, Endpoint):
        device = device.device
    cmd = msg.get("cmd")
    if cmd == "power-cut":
        cut = getattr(device, "power_cut", None)
        if cut is None:
            return _error(errno.ENOTSUP, f"{device.name} cannot simulate power loss")
        mig = getattr(device, "migration", None)
        if mig is not None and (not mig.running or mig.quiesced):
            # Stopped for a migration, a snapshot or a live handover: its state is being saved.
            return _error(errno.EBUSY, f"{device.name} is quiesced (migration or handover): no power cut now")
        keep, seed = msg.get("keep", 0.0), msg.get("seed", 0)
        if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0 <= keep <= 1:
            return _error(errno.EINVAL, "keep: a fraction 0..1 of the unflushed writes to keep")
        if isinstance(seed, bool) or not isinstance(seed, int):
            return _error(errno.EINVAL, "seed: an integer")
        try:
            result = await cut(keep=float(keep), seed=seed)
        except FaultError as exc:
            return _error(exc.errno, exc.reason)
        except Exception as exc:  # a backend that failed to take the kept writes
            log.error("power cut failed", exc_info=exc)
            return _error(getattr(exc, "errno", None) or errno.EIO, f"power cut: {exc}")
        return {"ok": True, **result}
    faults: FaultSet | None = getattr(device, "faults", None)
    if faults is None:
        return _error(errno.ENOTSUP, f"{device.name} has no fault injection")
    try:
        if cmd == "fault-add":
            text = msg.get("rule")
            if not isinstance(text, str):
                return _error(errno.EINVAL, "fault-add needs \"rule\": a rule string")
            rule = faults.add(text)
            return {"ok": True, **rule.as_dict()}
        if cmd == "fault-remove":
            which = msg.get("id")
            if which == "all":
                return {"ok": True, "removed": [r.as_dict() for r in faults.clear()]}
            if isinstance(which, bool) or not isinstance(which, int):
                return _error(errno.EINVAL, "fault-remove needs \"id\": a rule id or \"all\"")
            return {"ok": True, "removed": [faults.remove(which).as_dict()]}
        if cmd == "fault-list":
            return {"ok": True, **faults.describe()}
        if cmd == "fault-counters":
            rules = faults.rules()
            return {"ok": True, "fired": {str(r.id): r.fired for r in rules},
                    "seen": {str(r.id): r.seen for r in rules}, "total_fired": sum(r.fired for r in rules)}
    except FaultError as exc:
        return _error(exc.errno, exc.reason)
    return _error(errno.EINVAL, f"unknown command {cmd!r}")


class FaultControl:
    """A client of a server's control socket for its faults, for tests::

        async with FaultControl(path) as fc:
            rule = await fc.add("op=read,lba=8,status=media/0x81")
            ...
            assert (await fc.list())["rules"][0]["fired"] == 1

    Requests that the server refuses raise :class:`FaultError` with its errno and reason."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stream: trio.SocketStream | None = None
        self._buf = b""

    async def __aenter__(self) -> FaultControl:
        self._stream = await trio.open_unix_socket(self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stream is not None:
            await self._stream.aclose()

    async def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one command, return the server's reply whatever it says."""
        import json

        assert self._stream is not None, "use FaultControl in 'async with'"
        await self._stream.send_all(json.dumps(msg).encode() + b"\n")
        while b"\n" not in self._buf:
            data = await self._stream.receive_some(65536)
            if not data:
                raise ConnectionError("control socket closed")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def _ok(self, msg: dict[str, Any]) -> dict[str, Any]:
        reply = await self.request(msg)
        if not reply.get("ok"):
            raise FaultError(reply.get("reason", "refused"), reply.get("errno", errno.EIO))
        return reply

    async def add(self, rule: str) -> int:
        """Add a rule; its id."""
        return int((await self._ok({"cmd": "fault-add", "rule": rule}))["id"])

    async def remove(self, rule_id: int | str) -> list[dict[str, Any]]:
        return list((await self._ok({"cmd": "fault-remove", "id": rule_id}))["removed"])

    async def list(self) -> dict[str, Any]:
        return await self._ok({"cmd": "fault-list"})

    async def fired(self) -> dict[int, int]:
        reply = await self._ok({"cmd": "fault-counters"})
        return {int(k): v for k, v in reply["fired"].items()}

    async def power_cut(self, keep: float = 0.0, seed: int = 0) -> dict[str, Any]:
        return await self._ok({"cmd": "power-cut", "keep": keep, "seed": seed})
