"""Bottom layer: errors, OS interfaces, paths, the one atomic write and bounded lock, PHP semantics."""
