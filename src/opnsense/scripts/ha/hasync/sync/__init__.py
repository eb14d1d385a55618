"""The primary's sync: the run, its plan (digests first, fast path or compatible), snapshot, status."""
