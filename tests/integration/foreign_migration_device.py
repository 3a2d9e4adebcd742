"""The example device as a server that is not this project's would present its migration, for
tests of the client's fallback (libvfio-user cannot be a test dependency).

What it copies from libvfio-user (lib/libvfio-user.c, lib/migration.c at efd091b):

* DEVICE_FEATURE indices it does not know, the vendor ones 0xF100.. included, fail with EINVAL;
* DEVICE_RESET leaves the migration state alone (libvfio-user #844), so a device stuck in
  RESUMING after a refused stream stays there;
* its stream is its own: the example device's opaque stream, listed nowhere.
"""

from __future__ import annotations

import errno

from devices.example import DmaCopyEngine
from vfu_server.protocol.errors import VfioUserError
from vfu_server.protocol.messages import DeviceFeature

VENDOR_FEATURES = 0xF100


class ForeignEngine(DmaCopyEngine):
    cli_name = "foreign-example"

    async def device_feature(self, req: DeviceFeature) -> bytes:
        if req.index >= VENDOR_FEATURES:
            raise VfioUserError(f"unsupported operation(s), flags={req.flags}", errno.EINVAL)
        return await super().device_feature(req)

    async def do_reset(self) -> None:
        migration, self.migration = self.migration, None
        try:
            await super().do_reset()
        finally:
            self.migration = migration
