"""CLI subcommands. Each module here defines `register(subparsers)`; `hasync.cli`
discovers them, so adding a command never means editing a shared file."""
