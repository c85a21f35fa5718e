"""tl-app commands (insight); filled in by the module's owner."""

from __future__ import annotations

COMMANDS: list = []
