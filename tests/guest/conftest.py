"""Fixtures for tests that boot the Linux guest under QEMU 11.1.

VFU_SKIP_GUEST=1 skips them (and says so at the end of the run). Without it a provisioning
failure is an error in every guest test, never a silent skip: a CI machine that cannot fetch
QEMU must not look green.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vfu_guest import GuestKit, ProvisionError, provision

REPO_ROOT = Path(__file__).resolve().parents[2]
SKIP_GUEST = bool(os.environ.get("VFU_SKIP_GUEST"))


@pytest.fixture(scope="session")
def guest_kit() -> GuestKit:
    if SKIP_GUEST:
        pytest.skip("VFU_SKIP_GUEST is set: guest tests are skipped")
    try:
        return provision()
    except ProvisionError as exc:
        error = str(exc)
    pytest.fail(f"guest provisioning failed: {error}", pytrace=False)


@pytest.fixture
def repo_root() -> Path:
    """Working directory for device servers, so ``tests.guest.x:Class`` imports resolve."""
    return REPO_ROOT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SKIP_GUEST:
        terminalreporter.write_line(
            "VFU_SKIP_GUEST is set: guest tests (QEMU 11.1 + Linux) were SKIPPED", yellow=True
        )
