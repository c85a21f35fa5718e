"""TF Serving's models config file (``--model-config-file``): several models from several roots.

The text format TF Serving reads, parsed with its own proto::

    model_config_list {
      config {
        name: "flowers"
        base_path: "/models/flowers"          # holds the version folders 1, 2, ...
        model_platform: "tensorflow"
        model_version_policy { specific { versions: 1 versions: 2 } }   # or latest { num_versions: 1 }, all {}
        version_labels { key: "stable" value: 1 }
        version_labels { key: "canary" value: 2 }
      }
    }

Relative base paths are taken from the config file's folder. The server
re-reads the file at every poll of its models (``--poll-seconds``, as TF
Serving's ``--model_config_file_poll_wait_seconds``): models added appear,
removed ones are unloaded, and a config that does not parse is reported and
the one before it kept.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from tl_app.core.errors import ConfigError
from tl_app.models.artifacts import valid_model_name
from tl_app.serve.registry import Source

log = logging.getLogger("tl_app.serve")


def read_model_config(path: str | Path) -> dict[str, Source]:
    """name -> Source from a models config file, or ConfigError saying what is wrong and where."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"Cannot read the models config file {str(path)!r}: {exc.strerror or exc}. "
                          f"Pass an existing file to --model-config-file.") from None
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: not a TF Serving models config ({exc}). Expected "
                          f"'model_config_list {{ config {{ name: \"m\" base_path: \"/models/m\" }} }}'.") from None
    if config.WhichOneof("config") != "model_config_list" or not config.model_config_list.config:
        raise ConfigError(f"{path}: no models: expected model_config_list {{ config {{ name: ... base_path: ... }} }}.")
    sources: dict[str, Source] = {}
    for entry in config.model_config_list.config:
        where = f"{path}: model {entry.name!r}"
        if not valid_model_name(entry.name):
            raise ConfigError(f"{where}: the name must be letters, digits, '_', '-' or '.' (e.g. name: \"flowers\").")
        if entry.name in sources:
            raise ConfigError(f"{where} is listed twice; give each model one config entry.")
        if not entry.base_path:
            raise ConfigError(f"{where} has no base_path (the folder that holds its version folders 1, 2, ...).")
        if entry.model_platform not in ("", "tensorflow"):
            raise ConfigError(f"{where}: model_platform {entry.model_platform!r} is not served; use \"tensorflow\".")
        base = Path(entry.base_path).expanduser()
        if not base.is_absolute():
            base = path.parent / base
        policy = entry.model_version_policy.WhichOneof("policy_choice") or "latest"
        source = Source(base, policy=policy)
        if policy == "latest":
            source.num_versions = entry.model_version_policy.latest.num_versions or 1
        elif policy == "specific":
            source.versions = tuple(entry.model_version_policy.specific.versions)
            if not source.versions:
                raise ConfigError(f"{where}: model_version_policy specific {{ }} lists no versions.")
        source.labels = dict(entry.version_labels)
        bad = {k: v for k, v in source.labels.items() if policy == "specific" and v not in source.versions}
        if bad:
            raise ConfigError(f"{where}: labels {bad} name versions outside its version policy {list(source.versions)}.")
        sources[entry.name] = source
    return sources


class ConfigWatcher:
    """The models config file re-read when its content changes: new sources, or None (unchanged or broken)."""

    def __init__(self, path: str | Path, echo=None):
        self.path = Path(path)
        self.echo = echo
        self.digest = self._digest()  # the content the server started with
        self.error = ""  # why the current file was not taken ("" when it was)
        self.reloads = 0
        self.failures = 0

    def _digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def check(self) -> dict[str, Source] | None:
        digest = self._digest()
        if digest == self.digest:
            return None
        self.digest = digest  # a broken file is reported once, and read again when it changes
        try:
            sources = read_model_config(self.path)
        except ConfigError as exc:
            self.error, self.failures = str(exc), self.failures + 1
            self._say(f"[serve] models config not reloaded, the previous one is still served: {exc}", logging.ERROR)
            return None
        self.error, self.reloads = "", self.reloads + 1
        self._say(f"[serve] models config reloaded: {', '.join(sorted(sources))}", logging.INFO)
        return sources

    def _say(self, message: str, level: int) -> None:
        if self.echo:  # the server's console (tl-app serve), else the log
            self.echo(message)
        else:
            log.log(level, message)
