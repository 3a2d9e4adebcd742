"""Test helpers shipped for device developers: run a device server as a real process, and
driver-side helpers (NVMe queues, virtqueues) to exercise a device without a VM."""

from .process import ServerProcess, migration_pair, running_server

__all__ = ["ServerProcess", "migration_pair", "running_server"]
