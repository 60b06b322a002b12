"""Entry point of the ``landscape`` command: the group with every command registered."""

from __future__ import annotations

from landscape_cli.app import cli

COMMANDS = ("analyze", "check", "demo", "info", "plot", "report", "surface", "watch")
"""Each command attaches itself to :data:`cli` when its module is imported (on first use)."""

cli.add_lazy_commands({name: f"landscape_cli.commands.{name}" for name in COMMANDS})

__all__ = ["COMMANDS", "cli", "main"]


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="landscape")


if __name__ == "__main__":  # pragma: no cover
    main()
