"""tl-app commands (serving); filled in by the module's owner."""

from __future__ import annotations

COMMANDS: list = []
