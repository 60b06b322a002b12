"""``python -m cli`` runs the command line of the checkout it is started from.

The folder ``cli/`` is the package ``landscape_cli`` only through an editable install, so a
second checkout run with the first one's environment would mix its own ``landscape`` with
the installed checkout's commands (docs/architecture.md, "Writing code here").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_python_m_cli_runs_the_commands_of_the_checkout_it_starts_from(tmp_path):
    checkout = tmp_path / "second-checkout"
    shutil.copytree(ROOT / "cli", checkout / "cli",
                    ignore=shutil.ignore_patterns("__pycache__"))
    main = checkout / "cli" / "main.py"
    lines = []
    for line in main.read_text().splitlines():
        if line.strip() == 'cli.main(prog_name="landscape")':  # at its own indentation
            indent = line[: len(line) - len(line.lstrip())]
            lines.append(f'{indent}print("second checkout:", __file__)')
        lines.append(line)
    main.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # its `landscape`: this one's
    done = subprocess.run([sys.executable, "-m", "cli", "--help"], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"second checkout: {main}" in done.stdout
    assert "Usage: landscape" in done.stdout
