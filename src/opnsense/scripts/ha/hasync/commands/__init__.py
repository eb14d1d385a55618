"""CLI subcommands. Each module here defines `register(subparsers, common)`; `hasync.cli`
discovers them, so adding a command never means editing a shared file."""
