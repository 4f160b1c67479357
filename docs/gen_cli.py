"""Regenerate docs/cli.md from the commands' own --help."""

import os
import subprocess
from pathlib import Path

COMMANDS = ["nasprune-compile", "nasprune-profile", "nasprune", "nasprune train", "nasprune evaluate",
            "nasprune search", "nasprune export"]

parts = ["# CLI reference", "", "Generated from the commands' own `--help` (`python docs/gen_cli.py`)."]
for cmd in COMMANDS:
    text = subprocess.run(cmd.split() + ["--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "110"}).stdout
    parts += ["", f"## `{cmd}`", "", "```", text.rstrip(), "```"]
Path(__file__).with_name("cli.md").write_text("\n".join(parts) + "\n")
