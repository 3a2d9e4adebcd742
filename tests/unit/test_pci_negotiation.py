"""VERSION negotiation (server offer, client acceptance). Named test_pci_* only to sit with the
other core unit tests; it is sans-IO protocol logic."""

from __future__ import annotations

import errno
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfu_server.protocol.constants import MAX_VERSION_REPLY
from vfu_server.protocol.errors import MalformedMessage, VfioUserError
from vfu_server.protocol.messages import Version
from vfu_server.protocol.negotiation import ServerOffer, accept_server_reply, client_offer

KNOWN_CAPS = {"max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps", "write_multiple",
              "migration", "twin_socket"}

QEMU_CAPS = {
    "pgsizes": 4096,
    "max_msg_fds": 16,
    "max_dma_maps": 65535,
    "max_data_xfer_size": 1048576,
    "migration": {"max_bitmap_size": 268435456, "pgsize": 4096},
    "write_multiple": True,
}


def reply_size(reply: Version) -> int:
    return 16 + len(reply.pack())


def test_qemu_request() -> None:
    reply, session = ServerOffer().negotiate(Version(0, 0, QEMU_CAPS))
    assert (reply.major, reply.minor) == (0, 0)
    assert reply_size(reply) <= MAX_VERSION_REPLY
    caps = reply.capabilities
    assert caps["max_msg_fds"] == 16 and caps["pgsizes"] == 4096 and caps["max_dma_maps"] == 65535
    assert caps["max_data_xfer_size"] == 1 << 20
    assert caps["write_multiple"] is True
    assert "migration" not in caps and "twin_socket" not in caps
    assert session.write_multiple and session.peer_max_msg_fds == 16
    assert session.peer_capabilities["migration"]["pgsize"] == 4096
    # The client accepts what the server sent.
    assert accept_server_reply(Version.unpack(reply.pack())).write_multiple


@pytest.mark.parametrize("major", [1, 2, 0xFFFF])
def test_major_mismatch_enotsup(major: int) -> None:
    with pytest.raises(VfioUserError) as exc:
        ServerOffer().negotiate(Version(major, 0, QEMU_CAPS))
    assert exc.value.errno == errno.ENOTSUP


def test_newer_minor_is_accepted_by_the_server() -> None:
    reply, _ = ServerOffer().negotiate(Version(0, 7, {}))
    assert reply.minor == 0


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_msg_fds", "16"),
        ("max_msg_fds", True),
        ("max_msg_fds", -1),
        ("max_msg_fds", 1.5),
        ("max_data_xfer_size", None),
        ("max_data_xfer_size", [1]),
        ("pgsizes", {"a": 1}),
        ("pgsizes", False),
        ("max_dma_maps", -5),
        ("write_multiple", 1),
        ("write_multiple", "true"),
        ("write_multiple", None),
    ],
)
def test_bad_capability_types(key: str, value: object) -> None:
    with pytest.raises(MalformedMessage) as exc:
        ServerOffer().negotiate(Version(0, 0, {**QEMU_CAPS, key: value}))
    assert exc.value.errno == errno.EINVAL


def test_bad_types_through_the_wire_format() -> None:
    raw = b"\0\0\0\0" + json.dumps({"capabilities": {"max_msg_fds": "lots"}}).encode() + b"\0"
    with pytest.raises(MalformedMessage):
        ServerOffer().negotiate(Version.unpack(raw))


@pytest.mark.parametrize(
    "client_wm, server_wm, expect",
    [(True, True, True), (False, True, False), (True, False, False), (None, True, False)],
)
def test_write_multiple_only_when_offered(client_wm, server_wm, expect) -> None:
    caps = dict(QEMU_CAPS)
    if client_wm is None:
        del caps["write_multiple"]
    else:
        caps["write_multiple"] = client_wm
    reply, session = ServerOffer(write_multiple=server_wm).negotiate(Version(0, 0, caps))
    assert session.write_multiple is expect
    assert ("write_multiple" in reply.capabilities) is expect


def test_spec_defaults_when_keys_are_absent() -> None:
    _, session = ServerOffer().negotiate(Version(0, 0, {}))
    assert session.peer_max_msg_fds == 1
    assert session.max_data_xfer_size == 1 << 20
    assert not session.write_multiple


def test_max_data_xfer_size_is_the_smaller_one() -> None:
    reply, session = ServerOffer(max_data_xfer_size=1 << 20).negotiate(Version(0, 0, {"max_data_xfer_size": 8192}))
    assert reply.capabilities["max_data_xfer_size"] == 8192 == session.max_data_xfer_size
    reply, _ = ServerOffer().negotiate(Version(0, 0, {"max_data_xfer_size": 1 << 30}))
    assert reply.capabilities["max_data_xfer_size"] == 1 << 20
    reply, _ = ServerOffer().negotiate(Version(0, 0, {"max_data_xfer_size": 1}))
    assert reply.capabilities["max_data_xfer_size"] == 4096  # never below a page


def test_no_common_page_size() -> None:
    with pytest.raises(VfioUserError) as exc:
        ServerOffer().negotiate(Version(0, 0, {"pgsizes": 1 << 21}))
    assert exc.value.errno == errno.ENOTSUP


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "max_msg_fds": st.integers(0, 2**63),
            "max_data_xfer_size": st.integers(0, 2**63),
            "pgsizes": st.integers(1, 2**63).map(lambda x: x | 4096),
            "max_dma_maps": st.integers(0, 2**63),
            "write_multiple": st.booleans(),
            "migration": st.dictionaries(st.text(max_size=20), st.integers(), max_size=4),
            "twin_socket": st.dictionaries(st.text(max_size=20), st.booleans(), max_size=2),
        },
    ),
    # Unknown keys only: a known key with a string value is a malformed VERSION (tested above).
    st.dictionaries(st.text(max_size=30).filter(lambda k: k not in KNOWN_CAPS), st.text(max_size=30), max_size=4),
)
def test_reply_fits_qemus_buffer(caps: dict, junk: dict) -> None:
    reply, _ = ServerOffer().negotiate(Version(0, 0, {**junk, **caps}))
    assert reply_size(reply) <= MAX_VERSION_REPLY
    # Only integers and booleans, never floats or pgsizes 0 (QEMU aborts on those).
    for value in reply.capabilities.values():
        assert isinstance(value, int)
    assert reply.capabilities["pgsizes"] != 0
    assert "twin_socket" not in reply.capabilities


# --------------------------------------------------------------------------------------------
# client side (what QEMU checks in the reply)


def test_client_offer_round_trip() -> None:
    offer = client_offer(write_multiple=False, max_data_xfer_size=65536)
    back = Version.unpack(offer.pack())
    assert back.capabilities["max_data_xfer_size"] == 65536
    reply, session = ServerOffer().negotiate(back)
    assert not session.write_multiple and reply.capabilities["max_data_xfer_size"] == 65536


@pytest.mark.parametrize(
    "caps, code",
    [
        ({"pgsizes": 0}, errno.EINVAL),
        ({"pgsizes": 512}, errno.EINVAL),
        ({"max_msg_fds": 17}, errno.EINVAL),
        ({"max_data_xfer_size": (64 << 20) + 1}, errno.EINVAL),
        ({"max_dma_maps": 65536}, errno.EINVAL),
        ({"write_multiple": "yes"}, errno.EINVAL),
    ],
)
def test_client_rejects_bad_server_replies(caps: dict, code: int) -> None:
    with pytest.raises(VfioUserError) as exc:
        accept_server_reply(Version(0, 0, caps))
    assert exc.value.errno == code


def test_client_rejects_newer_server_version() -> None:
    for major, minor in ((1, 0), (0, 1)):
        with pytest.raises(VfioUserError) as exc:
            accept_server_reply(Version(major, minor, {}))
        assert exc.value.errno == errno.ENOTSUP
