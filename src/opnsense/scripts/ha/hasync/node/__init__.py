"""Changes to this node beyond a merge: reconfiguring after one, rollback, commit-confirm state,
the offline apply of a payload file."""
