"""A private apt configuration that resolves and downloads Debian packages without touching the host.

Every apt call gets its own sources list, package lists, archive cache and an *empty* dpkg status
file. The empty status makes apt resolve as if nothing were installed (so we get complete package
sets), and the host's dpkg database and apt state are never read or written. The host's apt.conf
fragments are still read on purpose: that is where proxies and similar site settings live.
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# The two suites QEMU 11.1 and the guest come from. sid is deliberately absent: it would win every
# version comparison and drag in libraries built against a newer glibc.
SUITES = ("trixie", "trixie-backports")


class ProvisionError(RuntimeError):
    """Provisioning failed; the message is one line that names the missing piece."""


@dataclass(frozen=True)
class DebFile:
    """One .deb as resolved by apt: where it comes from and which exact version it is."""

    name: str
    version: str
    filename: str
    uri: str
    size: int
    sha256: str


def _sources_from_deb822(text: str) -> list[str]:
    uris: list[str] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        suites = fields.get("suites", "").split()
        # The security archive is a different tree; we need the main archive.
        if any(s.endswith("-security") or s.endswith("/updates") for s in suites):
            continue
        uris.extend(fields.get("uris", "").split())
    return uris


def _sources_from_list(text: str) -> list[str]:
    uris: list[str] = []
    for line in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] == "deb" and not line[2].endswith("-security"):
            uris.append(line[1])
    return uris


def debian_mirror() -> str:
    """The machine's own Debian mirror URI (never hard-coded: CI and developers may use a local one)."""
    override = os.environ.get("VFU_DEBIAN_MIRROR")
    if override:
        return override.rstrip("/")
    candidates: list[str] = []
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.is_file():
        candidates += _sources_from_deb822(deb822.read_text())
    classic = Path("/etc/apt/sources.list")
    if not candidates and classic.is_file():
        candidates += _sources_from_list(classic.read_text())
    if not candidates:
        raise ProvisionError(
            "no Debian mirror found in /etc/apt/sources.list.d/debian.sources or "
            "/etc/apt/sources.list (set VFU_DEBIAN_MIRROR=<archive URI>)"
        )
    return candidates[0].rstrip("/")


class PrivateApt:
    """apt-get/apt-cache bound to a private state directory."""

    def __init__(self, state_dir: Path, mirror: str | None = None) -> None:
        self.dir = state_dir
        self.mirror = mirror or debian_mirror()
        for sub in ("lists/partial", "cache/archives/partial", "state", "prefs.d", "parts"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if not KEYRING.is_file():
            raise ProvisionError(f"missing {KEYRING} (install the debian-archive-keyring package)")
        sources = "".join(
            f"deb [signed-by={KEYRING}] {self.mirror} {suite} main\n" for suite in SUITES
        )
        self._write_if_changed(self.dir / "sources.list", sources)
        self._write_if_changed(self.dir / "status", "")
        self._write_if_changed(self.dir / "prefs", "")

    @staticmethod
    def _write_if_changed(path: Path, text: str) -> None:
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)

    def options(self) -> list[str]:
        d = self.dir
        opts = {
            "Dir::Etc::sourcelist": d / "sources.list",
            "Dir::Etc::sourceparts": d / "parts",
            "Dir::Etc::preferences": d / "prefs",
            "Dir::Etc::preferencesparts": d / "prefs.d",
            "Dir::State": d / "state",
            "Dir::State::Lists": d / "lists",
            "Dir::State::status": d / "status",
            "Dir::Cache": d / "cache",
            "Dir::Cache::archives": d / "cache/archives",
            "Debug::NoLocking": "1",
            "APT::Architecture": "amd64",
            "APT::Architectures": "amd64",
            "APT::Install-Recommends": "0",
            "APT::Get::AllowUnauthenticated": "0",
            "Acquire::Languages": "none",
            # Host configuration may say which release to prefer; ours must not be steered by it.
            "APT::Default-Release": "",
        }
        if os.geteuid() == 0:
            # As root apt would drop to _apt for downloads and then warn that _apt cannot write
            # into our root-owned cache.
            opts["APT::Sandbox::User"] = "root"
        out: list[str] = []
        for key, value in opts.items():
            out += ["-o", f"{key}={value}"]
        return out

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        proc = subprocess.run(
            [tool, *self.options(), *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"},
        )
        if proc.returncode != 0:
            raise ProvisionError(
                f"{tool} {args[0]} failed: {_first_error(proc.stderr or proc.stdout)}"
            )
        return proc.stdout

    def lists_present(self) -> bool:
        lists = self.dir / "lists"
        return all(any(lists.glob(f"*_dists_{s}_main_binary-amd64_Packages*")) for s in SUITES)

    def update(self) -> None:
        try:
            proc = subprocess.run(
                ["apt-get", *self.options(), "-q", "update"],
                capture_output=True,
                text=True,
                env={**os.environ, "LC_ALL": "C"},
                timeout=600,
            )
        except subprocess.TimeoutExpired as exc:
            raise ProvisionError(
                f"Debian archive {self.mirror} did not answer within 10 minutes"
            ) from exc
        # apt-get update exits 0 on some fetch failures (it keeps old lists), so also check stderr.
        failed = [
            ln for ln in proc.stderr.splitlines() if ln.startswith(("E:", "W: Failed", "Err:"))
        ]
        if proc.returncode != 0 or failed or not self.lists_present():
            detail = _first_error("\n".join(failed) or proc.stderr or proc.stdout)
            raise ProvisionError(
                f"cannot fetch package lists for {'/'.join(SUITES)} from the Debian archive "
                f"{self.mirror}: {detail}"
            )

    def resolve(self, specs: list[str]) -> list[DebFile]:
        """Exact files apt would download for `specs` (e.g. ``qemu-system-x86/trixie-backports``)."""
        try:
            out = self.run("apt-get", "download", "--print-uris", *specs, cwd=self.dir / "parts")
        except ProvisionError as exc:
            missing = re.findall(
                r"(?:Unable to locate package|Release '[^']+' for '[^']+')[^\n]*", str(exc)
            )
            raise ProvisionError(
                f"package lookup failed ({missing[0] if missing else exc}); the archive may have "
                "dropped a package version"
            ) from exc
        debs: list[DebFile] = []
        for line in out.splitlines():
            m = re.match(r"'([^']+)' (\S+) (\d+) (\S+)", line)
            if not m:
                continue
            uri, filename, size, digest = m.groups()
            name, version, _arch = urllib.parse.unquote(filename).removesuffix(".deb").split("_")
            algo, _, value = digest.partition(":")
            debs.append(
                DebFile(name, version, filename, uri, int(size), value if algo == "SHA256" else "")
            )
        if len(debs) != len(specs):
            raise ProvisionError(f"apt resolved {len(debs)} files for {len(specs)} packages")
        return debs

    def download(self, specs: list[str], into: Path) -> None:
        """Download into `into`; apt skips files that are already there with the right hash."""
        into.mkdir(parents=True, exist_ok=True)
        try:
            self.run("apt-get", "-q", "download", *specs, cwd=into)
        except ProvisionError as exc:
            raise ProvisionError(f"downloading packages from {self.mirror} failed: {exc}") from exc

    def show_field(self, spec: str, field: str) -> str:
        out = self.run("apt-cache", "show", spec)
        for line in out.split("\n\n", 1)[0].splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
        raise ProvisionError(f"{spec} has no {field} field")


def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("E:", "Err:", "W:"))]
    return (errors or lines or ["(no output)"])[0]
