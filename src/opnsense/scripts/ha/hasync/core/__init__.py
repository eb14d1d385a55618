"""Bottom layer: errors, OS interfaces, paths, the one atomic write and bounded lock, PHP's empty(),
the secret-field list, versions and the JSON schemas."""
