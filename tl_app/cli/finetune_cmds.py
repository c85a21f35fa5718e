"""tl-app commands (finetune); filled in by the module's owner."""

from __future__ import annotations

COMMANDS: list = []
