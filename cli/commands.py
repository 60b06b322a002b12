"""The commands of ``landscape``; each is thin over the library."""

from __future__ import annotations

from landscape_cli.main import cli  # noqa: F401
