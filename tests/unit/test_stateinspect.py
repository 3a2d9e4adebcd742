"""The independent reader (vfu_server.stateinspect) against the golden vectors,
cross-checked with vfu_server.migration, plus the vfu-state CLI."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vectors.jsonable import plain, positional

from vfu_devices.example_format import EXAMPLE_FORMATS, EXAMPLE_OPAQUE, EXAMPLE_STANDARD
from vfu_server.migration.session import LoadSession
from vfu_server.stateinspect import cli
from vfu_server.stateinspect.reader import Bad, inspect_stream

VECTORS = pathlib.Path(__file__).parents[1] / "vectors"
EXPECTED = json.loads((VECTORS / "example-expected.json").read_text())
STATE = EXPECTED["state"]
NAMES = sorted(EXPECTED["vectors"])


def test_stateinspect_imports_only_the_stdlib():
    pkg = pathlib.Path(cli.__file__).parent
    repo = pkg.parents[1]
    # The device families' decoders live next to their devices; they may use the reader only.
    plugins = [repo / "devices" / "nvme" / "stateinspect.py", repo / "devices" / "virtio" / "stateinspect.py",
               repo / "devices" / "example_stateinspect.py"]
    for src in [*pkg.glob("*.py"), *plugins]:
        tree = ast.parse(src.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                if node.module == "vfu_server.stateinspect.reader" and src in plugins:
                    continue
                assert not node.module.startswith(("vfu_server", "vfu_devices", "devices")), (src, node.module)
            if isinstance(node, ast.Import):
                for a in node.names:
                    assert not a.name.startswith(("vfu_server", "vfu_devices", "devices")), (src, a.name)


def test_vfu_state_loads_the_decoders_not_the_devices():
    code = ("import sys; from vfu_server.stateinspect import cli; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('vfu_devices'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["vfu_devices", "vfu_devices.example_stateinspect", "vfu_devices.nvme",
                                  "vfu_devices.nvme.stateinspect",
                                  "vfu_devices.virtio", "vfu_devices.virtio.stateinspect"]


@pytest.mark.parametrize("name", NAMES)
def test_main_reader_matches_vector(name):
    data = (VECTORS / name).read_bytes()
    ls = LoadSession(EXAMPLE_FORMATS)
    ls.write(data)
    state = ls.finish()
    assert ls.format.name == EXPECTED["vectors"][name]["format"]
    assert plain(state) == STATE
    # the encoder is stable: re-encoding gives the same bytes
    fmt = ls.format
    again = (fmt.encode_precopy(state) or b"") + fmt.encode(state)
    assert again == data


def _std_state_from_records(records):
    by = {r["name"]: r["fields"] for r in records}
    p, c, m = by["PROFILE"], by["PCI_CONFIG"], by["MSIX"]
    profile = {k: p[k] for k in STATE["profile"] if k in p}
    profile["bar_sizes"] = [p[f"bar{i}_size"] for i in range(6)]
    profile["bar_flags"] = [p[f"bar{i}_flags"] for i in range(6)]
    pci = {k: c[k] for k in STATE["pci"] if k in c}
    pci["bars"] = [c[f"bar{i}"] for i in range(6)]
    regs = {k: by["EXAMPLE_REGS"][k] for k in STATE["regs"]}
    return {"profile": profile, "pci": pci, "msix": {"vectors": m["vectors"], "pba": m["pba"]},
            "intx": {"level": by["INTX"]["level"]}, "regs": regs}


@pytest.mark.parametrize("name", NAMES)
def test_independent_reader_agrees(name):
    envs = inspect_stream((VECTORS / name).read_bytes())
    meta = EXPECTED["vectors"][name]
    assert [e["flags"][0] for e in envs] == meta["envelopes"]
    final = envs[-1]
    assert final["format"] == meta["format"] and final["format_uuid"] == meta["format_uuid"]
    assert final["checksums"] == "verified"
    if meta["format"] == EXAMPLE_STANDARD.name:
        assert [r["name"] for r in final["records"]] == [
            "PROFILE", "PCI_CONFIG", "MSIX", "INTX", "EXAMPLE_REGS"]
        assert _std_state_from_records(final["records"]) == STATE
        assert [r["name"] for r in envs[0]["records"]] == ["PROFILE"]
    else:
        (rec,) = final["records"]
        assert rec["fields"]["family_uuid"] == str(EXAMPLE_OPAQUE.uuid)
        assert rec["fields"]["tree"] == positional(STATE)


def test_cli_ok_and_bad(tmp_path, capsys):
    assert cli.main(["inspect", str(VECTORS / "example-standard.bin")]) == 0
    out = capsys.readouterr().out
    assert "example/std/1" in out and "EXAMPLE_REGS" in out and "irq_count = 3" in out
    assert cli.main(["inspect", "--json", str(VECTORS / "example-opaque.bin")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["format"] == "opaque/vfu-example"
    bad = tmp_path / "bad.bin"
    data = bytearray((VECTORS / "example-opaque.bin").read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    assert cli.main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checksum mismatch" in err


def test_both_readers_refuse_the_same_damage():
    for name in NAMES:
        data = (VECTORS / name).read_bytes()
        for cut in (1, 8, 30, len(data) // 2):
            with pytest.raises(Bad):
                inspect_stream(data[:-cut])
            ls = LoadSession(EXAMPLE_FORMATS)
            with pytest.raises(Exception, match=r"EBADMSG|EINVAL"):
                ls.write(data[:-cut])
                ls.finish()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(NAMES), st.integers(0, 1000), st.integers(0, 255), st.binary(max_size=8))
def test_independent_reader_fuzz(name, pos, val, junk):
    b = bytearray((VECTORS / name).read_bytes())
    b[pos % len(b)] = val
    for data in (bytes(b), bytes(b) + junk, junk):
        try:
            inspect_stream(data)
        except Bad:
            pass


def test_vectors_cover_every_example_format():
    assert {EXPECTED["vectors"][n]["format"] for n in NAMES} == {f.name for f in EXAMPLE_FORMATS}


def _standard_records():
    """Records of every device family's standard format, from the vectors' sample states."""
    from vfu_devices.example_format import sample_state as example_sample
    from vfu_devices.nvme.migration_format import NVME_STANDARD
    from vfu_devices.nvme.migration_format import sample_state as nvme_sample
    from vfu_devices.virtio.migration_format import BLK_STANDARD, NET_STANDARD, RNG_STANDARD
    from vfu_devices.virtio.migration_format import sample_state as virtio_sample

    yield EXAMPLE_STANDARD, EXAMPLE_STANDARD.to_records(example_sample(), 0)
    yield NVME_STANDARD, NVME_STANDARD.to_records(nvme_sample(), 0)
    for fmt, kind in ((BLK_STANDARD, "blk"), (NET_STANDARD, "net"), (RNG_STANDARD, "rng")):
        yield fmt, fmt.to_records(virtio_sample(kind), 0)


def _violations(records):
    """Streams section 2.6 and section 4 rules 6-7 say a reader refuses, by name."""
    from vfu_server.migration.envelope import REC_OPTIONAL, Record

    recs = list(records)
    yield "profile-not-first", [recs[1], recs[0], *recs[2:]]
    yield "two-types-swapped", [*recs[:2], recs[3], recs[2], *recs[4:]]
    yield "unknown-mandatory", [*recs[:-1], Record(0x06FF, b"x"), recs[-1]]
    yield "vendor-mandatory", [*recs, Record(0x8123, bytes(16))]
    yield "repeated-record", [*recs[:3], recs[2], *recs[3:]]
    yield "unknown-optional-is-fine", [recs[0], Record(0x06FF, b"x", REC_OPTIONAL), *recs[1:]]


def test_both_readers_refuse_the_same_order_violations():
    from vfu_server.migration.envelope import encode_envelope
    from vfu_server.migration.errors import MigrationError

    for fmt, records in _standard_records():
        for case, recs in _violations(records):
            data = encode_envelope(fmt.uuid, fmt.major, 0, recs, final=True)
            ok = case.endswith("-is-fine")
            if ok:
                inspect_stream(data)
                fmt.decode(data)
                continue
            with pytest.raises(Bad):
                inspect_stream(data)
            with pytest.raises(MigrationError) as info:
                fmt.decode(data)
            assert info.value.errno == 22, (fmt.name, case, info.value)


def test_nvme_dbbuf_before_nvmecs_is_refused_by_both_readers():
    from vfu_devices.nvme.migration_format import NVME_STANDARD, sample_state
    from vfu_server.migration.envelope import encode_envelope
    from vfu_server.migration.errors import MigrationError

    recs = NVME_STANDARD.to_records(sample_state(), 0)
    i = next(n for n, r in enumerate(recs) if r.type == 0x7001)
    assert recs[i + 1].type == 0x0113
    recs[i], recs[i + 1] = recs[i + 1], recs[i]
    data = encode_envelope(NVME_STANDARD.uuid, 1, 0, recs, final=True)
    with pytest.raises(Bad, match="out of the format's order"):
        inspect_stream(data)
    with pytest.raises(MigrationError, match="against the format's order"):
        NVME_STANDARD.decode(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_both_readers_agree_on_any_record_order(data):
    """Any order of a standard stream's records: both readers accept it exactly when it is the
    order section 4 rule 6 prescribes (every record here is known and distinct, so only the
    writer's own order passes), and refuse it otherwise."""
    from vfu_server.migration.envelope import encode_envelope
    from vfu_server.migration.errors import MigrationError

    fmt, records = data.draw(st.sampled_from(list(_standard_records())))
    order = data.draw(st.permutations(range(len(records))))
    stream = encode_envelope(fmt.uuid, fmt.major, 0, [records[i] for i in order], final=True)
    expected = list(order) == sorted(order)
    try:
        inspect_stream(stream)
        independent = True
    except Bad:
        independent = False
    try:
        fmt.decode(stream)
        main = True
    except MigrationError as exc:
        assert exc.errno == 22, exc
        main = False
    assert independent == main == expected, (fmt.name, order)


def test_reader_names_no_device_family():
    """The catalogue comes from the families' entry points; the reader holds only what every
    PCI device shares (spec section 5.1) and the opaque record."""
    src = (pathlib.Path(cli.__file__).parent / "reader.py").read_text()
    strings = [n.value for n in ast.walk(ast.parse(src))
               if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    for family in ("nvme", "virtio", "example", "EXAMPLE_REGS"):
        assert not [s for s in strings if family in s], family


def test_catalogue_is_the_spec_uuid_table():
    """What the families register is section 6.1's table, name for name and UUID for UUID."""
    import re

    from vfu_server.stateinspect.reader import FORMATS

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "migration-format.md").read_text()
    table = re.findall(r"^\| ([a-z0-9/.-]+) \| (?:standard|opaque) \| ([0-9a-f-]{36}) \|$", doc, re.M)
    assert {name: uid for uid, name in ((str(u), n) for u, n in FORMATS.items())} == dict(table)


def test_a_family_cannot_take_another_ones_record_type():
    from vfu_server.stateinspect import reader

    before = dict(reader.RECORDS)
    with pytest.raises(ValueError, match="0x0001 is PROFILE already"):
        reader.register_records({0x0001: ("MINE", [("x", "I")], False)})
    with pytest.raises(ValueError, match="0x0111 has a decoder already"):
        reader.register_records({}, {0x0111: lambda p: {}})
    # The same definition again (a module imported twice) is no conflict.
    reader.register_records({0x0300: reader.RECORDS[0x0300]})
    assert before == reader.RECORDS


def test_a_broken_family_leaves_the_reader_working():
    """An entry point whose module fails to import is a warning; the others still decode."""
    code = (
        "import importlib.metadata as md, warnings, sys\n"
        "real = md.entry_points\n"
        "def eps(**kw):\n"
        "    out = list(real(**kw))\n"
        "    return out + [md.EntryPoint('broken', 'no_such_module_s9', 'vfu_server.stateinspect')]\n"
        "md.entry_points = eps\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from vfu_server.stateinspect import reader\n"
        "print([str(x.message) for x in w])\n"
        "print(sorted(reader.ORDER))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    warned, order = out.stdout.splitlines()
    assert "the broken decoders (no_such_module_s9) are not loaded: ModuleNotFoundError" in warned
    assert "nvme-ctrl/std/1" in order and "example/std/1" in order
