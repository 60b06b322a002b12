"""``python -m cli`` from a checkout's root runs that checkout's ``landscape`` command.

Handy with a second checkout and the first one's environment: the installed ``landscape``
executable would run the installed checkout's commands (docs/architecture.md).
"""

from __future__ import annotations

from .checkout import use_this_checkout

if __name__ == "__main__":
    use_this_checkout()
    from landscape_cli.entry import main  # (after the mapping: this folder)

    main()
