"""What a sync carries and how it lands: building the payload, the merge, per-item digests."""
