"""On-device adaptation (docs/on-device.md): a memory budget for training, and adapter versions with rollback."""
