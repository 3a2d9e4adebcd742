"""The early --nice step (vfu_server/priority.py): read from the raw command line, before the
imports a successor's start-up would otherwise run at a higher priority than its predecessor."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfu_server.priority import BASE_ENV, DEFAULT_NICE, MAX_NICE, nice_in_argv


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
    (["nvme", "--nic", "5"], None),  # argparse takes the abbreviation: the parser decides
    (["nvme", "--ni=5"], None),
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


def test_a_successor_started_by_a_lowered_server_is_not_lowered_twice() -> None:
    """The reload path starts the successor from the server (nice 10): it must run at 10, not
    at 10 + 10."""
    code = ("import os, sys; from vfu_server.priority import lower_to; lower_to(int(sys.argv[1])); "
            "import subprocess; print(os.getpriority(os.PRIO_PROCESS, 0), subprocess.run([sys.executable, '-c', "
            "'import os, sys; from vfu_server.priority import lower_to; lower_to(int(sys.argv[1])); "
            "print(os.getpriority(os.PRIO_PROCESS, 0))', sys.argv[1]], capture_output=True, text=True).stdout.strip())")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    env = {k: v for k, v in os.environ.items() if k != BASE_ENV}
    out = subprocess.run([sys.executable, "-c", code, "4"], capture_output=True, text=True, check=True, env=env).stdout
    want = min(MAX_NICE, base + 4)
    assert out.split() == [str(want), str(want)]
