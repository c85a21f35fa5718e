"""Errors that reach the user as a message, never as a traceback."""

from __future__ import annotations

import difflib
from typing import Iterable


class TlAppError(Exception):
    """A user-facing error: the CLI prints its message and exits non-zero.

    The message says what happened, what was expected and how to fix it.
    """

    exit_code = 2


class ConfigError(TlAppError):
    """A configuration key, value or type the user gave is not valid."""


class DataError(TlAppError):
    """The dataset folder cannot be used (missing, empty, strict-mode failures)."""


class WeightsUnavailableError(TlAppError):
    """Pretrained weights cannot be found locally nor downloaded."""


class ModelNotFoundError(TlAppError):
    """A model folder, version or run directory does not exist."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest valid choice to a mistyped name, or None."""
    matches = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def plural(kind: str) -> str:
    """class -> classes, layer of vgg16 -> layers of vgg16 (the noun, not the model name, takes the plural)."""
    noun, sep, rest = kind.partition(" of ")
    noun = noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
    return noun + sep + rest


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> str:
    """Message for an unknown name: the valid list and the closest match."""
    choices = sorted(choices)
    hint = closest(name, choices)
    message = f"Unknown {kind} {name!r}. Valid {plural(kind)}: {', '.join(choices)}."
    if hint:
        message += f" Did you mean {hint!r}?"
    return message


class ExportError(TlAppError):
    """An export could not be completed (conversion or parity failure)."""
