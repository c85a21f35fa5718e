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

Relative base paths are taken from the config file's folder.
"""

from __future__ import annotations

from pathlib import Path

from tl_app.core.errors import ConfigError
from tl_app.models.artifacts import valid_model_name
from tl_app.serve.registry import Source


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
