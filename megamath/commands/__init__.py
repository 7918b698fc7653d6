"""Subcommands of the `megamath` CLI: each module declares its flags and calls the library."""
