"""VFIO migration v2 FSM: arcs, shortest paths, and agreement with the kernel's table."""

from __future__ import annotations

import errno
import itertools

import pytest

from vfu_server.migration.errors import MigrationError
from vfu_server.migration.fsm import (
    MigrationFeature,
    MigrationStateMachine,
    MigState,
    allowed_arcs,
    next_state,
    supported_states,
    transition_path,
    v1_check_transition,
    v1_to_v2,
)

S = MigState
F = MigrationFeature
ALL = F.STOP_COPY | F.P2P | F.PRE_COPY

# The kernel's next-hop table (drivers/vfio/vfio_main.c) for a device with every
# feature, transcribed as "from: {to: next}"; anything absent or ERROR is refused.
KERNEL_NEXT = {
    S.STOP: {S.STOP: S.STOP, S.RUNNING: S.RUNNING_P2P, S.PRE_COPY: S.RUNNING_P2P,
             S.PRE_COPY_P2P: S.RUNNING_P2P, S.STOP_COPY: S.STOP_COPY,
             S.RESUMING: S.RESUMING, S.RUNNING_P2P: S.RUNNING_P2P},
    S.RUNNING: {S.STOP: S.RUNNING_P2P, S.RUNNING: S.RUNNING, S.PRE_COPY: S.PRE_COPY,
                S.PRE_COPY_P2P: S.RUNNING_P2P, S.STOP_COPY: S.RUNNING_P2P,
                S.RESUMING: S.RUNNING_P2P, S.RUNNING_P2P: S.RUNNING_P2P},
    S.PRE_COPY: {S.STOP: S.RUNNING, S.RUNNING: S.RUNNING, S.PRE_COPY: S.PRE_COPY,
                 S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.PRE_COPY_P2P,
                 S.RESUMING: S.RUNNING, S.RUNNING_P2P: S.RUNNING},
    S.PRE_COPY_P2P: {S.STOP: S.RUNNING_P2P, S.RUNNING: S.RUNNING_P2P, S.PRE_COPY: S.PRE_COPY,
                     S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.STOP_COPY,
                     S.RESUMING: S.RUNNING_P2P, S.RUNNING_P2P: S.RUNNING_P2P},
    S.STOP_COPY: {S.STOP: S.STOP, S.RUNNING: S.STOP, S.STOP_COPY: S.STOP_COPY,
                  S.RESUMING: S.STOP, S.RUNNING_P2P: S.STOP},
    S.RESUMING: {S.STOP: S.STOP, S.RUNNING: S.STOP, S.PRE_COPY: S.STOP,
                 S.PRE_COPY_P2P: S.STOP, S.STOP_COPY: S.STOP, S.RESUMING: S.RESUMING,
                 S.RUNNING_P2P: S.STOP},
    S.RUNNING_P2P: {S.STOP: S.STOP, S.RUNNING: S.RUNNING, S.PRE_COPY: S.RUNNING,
                    S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.STOP,
                    S.RESUMING: S.STOP, S.RUNNING_P2P: S.RUNNING_P2P},
}


def kernel_next(cur: S, new: S, features: F) -> S | None:
    """The kernel algorithm: table lookup, then skip hops into unsupported states."""
    states = supported_states(features)
    if cur not in states or new not in states or S.ERROR in (cur, new):
        return None
    nxt = KERNEL_NEXT[cur].get(new)
    while nxt is not None and nxt not in states:
        nxt = KERNEL_NEXT[nxt].get(new)
    return nxt


FEATURE_SETS = [F.STOP_COPY, F.STOP_COPY | F.PRE_COPY, F.STOP_COPY | F.P2P, ALL]


@pytest.mark.parametrize("features", FEATURE_SETS, ids=lambda f: str(int(f)))
def test_next_hop_matches_kernel_for_every_pair(features):
    for cur, new in itertools.product(S, S):
        expected = kernel_next(cur, new, features)
        if expected is None:
            with pytest.raises(MigrationError) as ei:
                next_state(cur, new, features)
            assert ei.value.errno == errno.EINVAL
        else:
            assert next_state(cur, new, features) == expected, (cur, new)


@pytest.mark.parametrize("features", FEATURE_SETS, ids=lambda f: str(int(f)))
def test_paths_only_use_direct_arcs_and_never_cross_saving_states(features):
    arcs = allowed_arcs(features)
    for cur, new in itertools.product(supported_states(features) - {S.ERROR}, repeat=2):
        try:
            path = transition_path(cur, new, features)
        except MigrationError:
            continue
        hops = [cur, *path]
        assert all((a, b) in arcs for a, b in itertools.pairwise(hops))
        saving = {S.STOP_COPY, S.PRE_COPY, S.PRE_COPY_P2P}
        if not (cur in saving and new in saving):
            assert not set(hops[1:-1]) & saving


def test_vfio_user_arc_list():
    # vfio-user (no P2P): exactly the spec's list.
    assert allowed_arcs(F.STOP_COPY | F.PRE_COPY) == {
        (S.RUNNING, S.STOP), (S.STOP_COPY, S.STOP), (S.RESUMING, S.STOP),
        (S.PRE_COPY, S.RUNNING), (S.STOP, S.RUNNING),
        (S.RUNNING, S.PRE_COPY), (S.STOP, S.STOP_COPY), (S.PRE_COPY, S.STOP_COPY),
        (S.STOP, S.RESUMING),
    }


def test_libvfio_user_examples():
    f = F.STOP_COPY | F.PRE_COPY
    assert transition_path(S.RUNNING, S.STOP_COPY, f) == [S.STOP, S.STOP_COPY]
    assert transition_path(S.RUNNING, S.RESUMING, f) == [S.STOP, S.RESUMING]
    assert transition_path(S.PRE_COPY, S.STOP, f) == [S.RUNNING, S.STOP]
    assert transition_path(S.RESUMING, S.RUNNING, f) == [S.STOP, S.RUNNING]
    assert transition_path(S.RUNNING, S.RUNNING, f) == []


@pytest.mark.parametrize(
    ("cur", "new"),
    [(S.STOP_COPY, S.PRE_COPY), (S.RUNNING, S.ERROR), (S.ERROR, S.STOP),
     (S.RUNNING, S.RUNNING_P2P), (S.RUNNING, 9)],
)
def test_refused_requests(cur, new):
    with pytest.raises(MigrationError) as ei:
        transition_path(cur, new, F.STOP_COPY | F.PRE_COPY)
    assert ei.value.errno == errno.EINVAL


def test_pre_copy_unsupported_refused():
    with pytest.raises(MigrationError):
        transition_path(S.RUNNING, S.PRE_COPY, F.STOP_COPY)
    with pytest.raises(MigrationError):
        supported_states(F.PRE_COPY)  # STOP_COPY is mandatory


def test_machine_calls_callback_per_arc():
    seen = []
    m = MigrationStateMachine(F.STOP_COPY | F.PRE_COPY, lambda a, b: seen.append((a, b)))
    assert m.request(S.STOP_COPY) == S.STOP_COPY
    assert seen == [(S.RUNNING, S.STOP), (S.STOP, S.STOP_COPY)]
    m.request(S.RESUMING)
    assert seen[2:] == [(S.STOP_COPY, S.STOP), (S.STOP, S.RESUMING)]


def test_machine_refused_arc_stays_put():
    def cb(a, b):
        if b == S.STOP_COPY:
            raise MigrationError(errno.ENOMEM, "no buffer")

    m = MigrationStateMachine(on_arc=cb)
    with pytest.raises(MigrationError) as ei:
        m.request(S.STOP_COPY)
    assert ei.value.errno == errno.ENOMEM
    assert m.state == S.STOP  # the first arc happened, the second did not


def test_machine_crash_goes_to_error_until_reset():
    def cb(a, b):
        raise RuntimeError("boom")

    m = MigrationStateMachine(on_arc=cb)
    with pytest.raises(MigrationError) as ei:
        m.request(S.STOP)
    assert ei.value.errno == errno.EIO
    assert m.state == S.ERROR
    with pytest.raises(MigrationError):
        m.request(S.RUNNING)
    m.reset()
    assert m.state == S.RUNNING


def test_machine_reentrancy_refused():
    m = MigrationStateMachine()

    def cb(a, b):
        m.request(S.RUNNING)

    m.on_arc = cb
    with pytest.raises(MigrationError) as ei:
        m.request(S.STOP)
    assert ei.value.errno == errno.EBUSY


def test_v1_mapping_and_table():
    assert v1_to_v2(0b011) == S.PRE_COPY
    assert v1_to_v2(0b110) == S.ERROR
    for bad in (0b101, 0b111):
        with pytest.raises(MigrationError):
            v1_to_v2(bad)
    v1_check_transition(0b001, 0b011)
    with pytest.raises(MigrationError):
        v1_check_transition(0b011, 0b001)
