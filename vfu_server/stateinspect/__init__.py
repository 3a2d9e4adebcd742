"""``vfu-state``: an independent, stdlib-only reader of DEVSTATE device-state streams.

It is written from docs/migration-format.md alone and imports nothing from
``vfu_server.migration`` or from devices, so it can cross-check the encoder.
"""
