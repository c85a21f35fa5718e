"""tl-app commands (features); filled in by the module's owner."""

from __future__ import annotations

COMMANDS: list = []
