"""Entry point of the ``landscape`` command: the group with every command attached."""

from __future__ import annotations

from landscape_cli.app import cli
from landscape_cli.commands import (  # noqa: F401  (they attach themselves to `cli`)
    analyze,
    check,
    demo,
    info,
    plot,
    report,
    surface,
    watch,
)

__all__ = ["cli", "main"]


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="landscape")


if __name__ == "__main__":  # pragma: no cover
    main()
