"""virtio devices on the virtio-pci modern transport: blk, net, rng."""
