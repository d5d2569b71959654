"""The run folder and its checkpoints: layout, lock, manifests and verification, reading weights,
resharding, `checkpoint verify`."""
