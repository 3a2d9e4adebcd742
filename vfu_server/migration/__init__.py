"""Device-state migration: VFIO v2/v1 state machines, the self-describing
state envelope, selectable standard/opaque formats, and sans-IO sessions.

See docs/migration-format.md for the byte-level specification.
"""
