"""opnsense-ha: High Availability engine for OPNsense.

The package is usable as a library: the CLI (`hasync.cli`) and the configd scripts are thin
wrappers around the modules here.

The records of the modules a no-op `opnsense-ha sync` imports are `typing.NamedTuple`s, or plain
classes where they are filled in as a sync runs, never dataclasses: `dataclasses` writes and
`exec`s each class's methods, ~0.5 ms of a command's start per class, and a no-op sync imports
a few dozen records (issue 12: its start-up). `tests/cli/test_cli_startup.py` checks that such a
sync leaves `dataclasses` unloaded.
"""

__version__ = "0.1.0"
