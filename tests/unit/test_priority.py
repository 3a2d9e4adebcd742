"""The early --nice step (vfu_server/priority.py): read from the raw command line, before the
imports a successor's start-up would otherwise run at a higher priority than its predecessor."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfu_server.priority import DEFAULT_NICE, MAX_NICE, nice_in_argv


@pytest.mark.parametrize(("argv", "nice"), [
    ([], DEFAULT_NICE),
    (["nvme", "--socket", "s"], DEFAULT_NICE),
    (["nvme", "--nice", "7"], 7),
    (["nvme", "--nice=0"], 0),
    (["nvme", "--nice", "3", "--nice", "5"], 5),  # the last one wins, as with argparse
    (["nvme", "--nice", "x"], None),
    (["nvme", "--nice"], None),
    (["nvme", "--nice", str(MAX_NICE + 1)], None),
    (["nvme", "--nice", "-1"], None),
    (["nvme", "--", "--nice", "4"], DEFAULT_NICE),
])
def test_nice_in_argv(argv: list[str], nice: int | None) -> None:
    assert nice_in_argv(argv) == nice


@given(st.lists(st.text(max_size=12), max_size=8))
def test_any_command_line_gives_a_nice_in_range_or_none(argv: list[str]) -> None:
    nice = nice_in_argv(argv)
    assert nice is None or 0 <= nice <= MAX_NICE


def test_the_early_step_imports_nothing_heavy() -> None:
    code = "import sys, vfu_server.priority; print(sorted(m for m in ('trio', 'vfu_server.pci') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
