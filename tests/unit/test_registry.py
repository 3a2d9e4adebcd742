"""Device names come from ``vfu_server.devices`` entry points only (the library's own devices
register theirs the same way), read from the distributions on ``sys.path``."""

import sys

import pytest

from vfu_server import registry

DEVICE = '''
from vfu_server import PciDevice, PciIdentity


class Thing(PciDevice):
    identity = PciIdentity(vendor_id=0x1234, device_id=0x7777)
'''


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site directory on sys.path with one distribution that registers ``thing``."""
    (tmp_path / "thingpkg.py").write_text(DEVICE)
    dist = tmp_path / "thingpkg-1.0.dist-info"
    dist.mkdir()
    (dist / "entry_points.txt").write_text(
        "[console_scripts]\nthing = thingpkg:main\n\n"
        "[vfu_server.devices]\nthing = thingpkg:Thing\n# a comment\nbroken = thingpkg:Missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("thingpkg", None)


def test_builtin_devices_are_entry_points():
    names = registry.available()
    assert {"example", "nvme", "virtio-blk", "virtio-net", "virtio-rng"} <= set(names)
    assert registry.load("example").__name__ == "DmaCopyEngine"


def test_a_third_party_entry_point_is_a_device_name(site):
    assert registry.load("thing").__name__ == "Thing"
    assert registry.available()["thing"] == "thingpkg:Thing"
    assert "broken" not in registry.available(), "an entry point that cannot load is not listed"
    assert registry._entry_points()["thing"] == "thingpkg:Thing", "other groups are not devices"


def test_the_first_distribution_on_the_path_wins(site, tmp_path_factory):
    later = tmp_path_factory.mktemp("later")
    (later / "other-1.0.dist-info").mkdir()
    (later / "other-1.0.dist-info" / "entry_points.txt").write_text(
        "[vfu_server.devices]\nthing = otherpkg:Other\n")
    sys.path.append(str(later))
    try:
        assert registry._entry_points()["thing"] == "thingpkg:Thing"
    finally:
        sys.path.remove(str(later))


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(registry.UnknownDevice, match=r"unknown device 'nope' \(known: .*example.*nvme"):
        registry.load("nope")
