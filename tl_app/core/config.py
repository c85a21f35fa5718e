"""The one typed configuration: the single source of defaults.

Pipeline TOML files and CLI flags override these dataclasses; the resolved
configuration is written next to every artifact (``config.json``/``config.toml``).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from tl_app.core.errors import ConfigError, closest

RESIZE_POLICIES = ("auto", "stretch", "center_crop", "letterbox")
STRATEGIES = ("bottleneck", "finetune", "metric")  # metric: a projection learned by a contrastive loss (training.metric)
OPTIMIZERS = ("sgd", "rmsprop", "adagrad", "adadelta", "adam", "adamw", "nadam")
SCHEDULES = ("constant", "cosine", "step", "plateau")
POOLINGS = ("avg", "max", "flatten")
HEAD_KINDS = ("dense", "logistic", "knn", "prototype")
FEWSHOT_HEADS = ("knn", "prototype")  # no gradient training; classes can be added later
PRECISIONS = ("none", "float16", "bfloat16")
DISTRIBUTE = ("none", "mirrored", "multi-worker")
ENGINES = ("local", "ray")
CALIBRATIONS = ("none", "temperature")  # temperature: fitted on validation, applied inside every export
OODS = ("none", "knn", "mahalanobis")  # knn | mahalanobis: an ood_score output and an "unknown" answer in exports
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold: the default pixel limit everywhere
# test-time augmentation (predict/evaluate/export --tta N): the first N of: the image, its horizontal flip,
# 5 crops (centre, then the corners) and their flips, each resized back to the input size (models.tta)
TTA_VIEWS = 12
FINETUNE_ONLY = ("ema", "mixup", "cutmix", "lr_decay_per_block")  # train.* keys only --strategy finetune reads


@dataclass
class DataConfig:
    """Where the images are and how they are split, decoded and weighted."""

    root: str = "datasets/sample"
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_seed: int = 0
    resize_policy: str = "auto"
    max_pixels: int = MAX_PIXELS
    strict: bool = False
    class_weights: Union[str, dict] = "balanced"
    imbalance_warning_ratio: float = 3.0
    background: list = field(default_factory=lambda: [255, 255, 255])
    batch_size: int = 32
    exclude: str = ""  # issues.csv (tl-app datasets doctor): rows with action "exclude" leave the run
    relabel: str = ""  # issues.csv: rows with action "relabel" take their suggested_label


@dataclass
class BackboneConfig:
    """Which pretrained network, which weights, which features."""

    name: str = "resnet50"  # or "auto": a K-fold logistic probe per candidate chooses (tl-app select)
    weights: str = "imagenet"  # imagenet | none | path to a weight file
    candidates: list = field(default_factory=list)  # name = "auto": the backbones to compare; empty: all
    select_budget: str = "10m"  # name = "auto": time for the comparison (90s, 10m, 1h)
    input_size: int = 0  # 0: the backbone's default
    seed: int = 0  # initialises weights when weights = "none"
    layer: str = ""  # empty: the last convolutional block
    pooling: str = "avg"


@dataclass
class AugmentConfig:
    """Training-only augmentation, shared by fine-tuning and cached views."""

    horizontal_flip: bool = True
    vertical_flip: bool = False
    rotation: float = 0.05  # fraction of a full turn
    zoom: float = 0.1
    translation: float = 0.1
    random_crop: float = 0.0  # fraction of each side that may be cropped
    shear: float = 0.0
    contrast: float = 0.1
    brightness: float = 0.1
    channel_shift: float = 0.0  # in pixel units (0..255)
    grayscale: float = 0.0  # probability


@dataclass
class HeadConfig:
    """The small classifier on top of the features."""

    kind: str = "dense"
    units: list = field(default_factory=lambda: [256])
    dropout: float = 0.3
    batch_norm: bool = False
    l1: float = 0.0
    l2: float = 0.0
    max_norm: float = 0.0  # 0: no constraint
    neighbors: int = 5  # knn: how many nearest training features vote (weighted by similarity)
    shrinkage: float = 0.0  # prototype: 0 plain cosine to class means; >0 whitened by a shrunk covariance
    temperature: float = 0.05  # knn/prototype: softmax temperature over cosine similarities
    standardize: bool = True  # dense/logistic: standardise the features (training split's mean/std) in the head


@dataclass
class FeaturesConfig:
    """The bottleneck feature cache."""

    cache_dir: str = ".cache/features"
    dtype: str = "float32"
    augment_views: int = 0
    out: str = ""  # extract writes here; empty: runs/<name>/features
    runtime: str = "keras"  # keras | onnxruntime | tflite (converted once, used only if it matches Keras within 1e-4)
    precision: str = "fp32"  # fp32 | bf16 (Keras mixed_bfloat16) | int8 (ONNX Runtime); others gated: cosine >= 0.999


@dataclass
class TrainConfig:
    """Optimisation, both strategies."""

    strategy: str = "bottleneck"
    name: str = ""
    runs_dir: str = "runs"
    epochs: int = 20  # head epochs (phase 1)
    finetune_epochs: int = 5  # phase 2
    unfreeze_blocks: int = 1
    unfreeze_layers: int = 0  # >0: unfreeze this many top layers instead of blocks
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_find: bool = False  # true: run the learning-rate range test first and train at its suggestion
    finetune_lr_factor: float = 0.1
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "constant"
    warmup_epochs: int = 0
    step_every: int = 10
    step_factor: float = 0.5
    label_smoothing: float = 0.0
    focal_gamma: float = 0.0  # >0: focal loss
    early_stopping_patience: int = 5
    mixed_precision: str = "none"
    jit_compile: bool = False
    distribute: str = "none"
    seed: int = 0
    deterministic: bool = False
    calibration: str = "temperature"  # none | temperature (see CALIBRATIONS)
    # bottleneck: fewer validation images than this -> the temperature is fitted on 5-fold out-of-fold
    # probabilities over train+val (fresh heads per fold) instead of validation alone; 0 = always validation
    calibration_oof_below: int = 200
    ood: str = "knn"  # none | knn | mahalanobis (see OODS): fitted on training features, threshold on val
    ema: bool = False  # finetune: keep an exponential moving average of the weights; validate and export it
    ema_momentum: float = 0.99  # ema: weight of the average at each step (closer to 1: a longer memory)
    mixup: float = 0.0  # finetune: Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0  # finetune: Beta(alpha, alpha) of CutMix; 0 = off (both on: one of the two per batch)
    lr_decay_per_block: float = 1.0  # finetune phase 2: each deeper unfrozen block learns this x slower; 1 = off
    # metric: after the projection, also train the top backbone blocks (unfreeze_blocks/layers) with the
    # contrastive loss for finetune_epochs on augmented images (BatchNorm frozen); false = projection only
    metric_backbone: bool = False


@dataclass
class ExportConfig:
    """Where and how trained models are exported."""

    root: str = "saved_models"
    name: str = ""
    formats: list = field(default_factory=lambda: ["savedmodel", "keras"])
    quantize: bool = False
    tta: int = 1  # >1: test-time augmentation over this many views inside every exported format (see TTA_VIEWS)


@dataclass
class ServeConfig:
    """The HTTP model server."""

    host: str = "127.0.0.1"
    port: int = 8501
    batching: bool = True  # dynamic batching of concurrent requests
    max_batch_size: int = 32
    batch_timeout_ms: float = 5.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 64
    token: str = ""
    top_k: int = 5
    max_pixels: int = 0  # per uploaded image; 0: the model card's data.max_pixels (else 89478485)
    poll_seconds: float = 2.0  # how often the root is checked for new versions
    workers: int = 4  # threads that run model calls; request images are decoded in Starlette's threadpool
    grpc_port: int = 8500  # TF Serving's gRPC PredictionService/ModelService; 0 turns it off
    model_config_file: str = ""  # TF Serving's models config (text proto): several models, roots, labels
    allowed_hosts: list = field(default_factory=list)  # Host headers accepted; [] = loopback names on loopback
    image_pixels: int = 16_000_000  # decoded pixels per image: JPEG is downscaled while decoding, others 413
    inflight_pixels: int = 32_000_000  # decoded pixels of all requests in flight together (others wait)
    header_timeout_s: float = 10.0  # a connection must send its request headers within this
    body_timeout_s: float = 30.0  # and its body within this (408 otherwise)
    max_connections: int = 256  # open connections and requests; more get 503
    allowed_batch_sizes: list = field(default_factory=list)  # pad batches up to these (TF Serving); [] = no padding


@dataclass
class PredictConfig:
    """Batch inference (tl-app predict)."""

    top_k: int = 5
    batch_size: int = 32
    progress: bool = True
    max_pixels: int = 0  # per image; 0: the model card's (or run's) data.max_pixels, else 89478485
    tta: int = 1  # predict and evaluate: average the probabilities over this many views (1: one pass; TTA_VIEWS)
    runtime: str = "keras"  # keras | onnxruntime | tflite (converted once beside the model; refused unless = Keras)
    precision: str = "fp32"  # fp32 | int8 (ONNX Runtime, quantised on the first images; refused below 99% agreement)


@dataclass
class EngineConfig:
    """Where heavy work runs: this process ("local") or a Ray cluster ("ray"; pip install 'tl-app[ray]')."""

    name: str = "local"
    address: str = ""  # ray: "" starts a local instance, "auto" joins a running one, ray://host:10001 a remote one
    num_workers: int = 1  # ray: backbone actors (extract, predict) or training workers
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class Config:
    """Every setting of a tl-app run."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    # ---- conversions -------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "Config":
        config = cls()
        merge(config, data, source=source)
        validate(config)
        return config

    def with_overrides(self, overrides: dict) -> "Config":
        """A copy with dotted keys (``"train.epochs": 3``) replaced; None means unset."""
        copy = Config.from_dict(self.to_dict())
        nested: dict = {}
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, _, key = dotted.partition(".")
            nested.setdefault(section, {})[key] = value
        merge(copy, nested, source="command line")
        validate(copy)
        return copy

    def write(self, directory: str | Path) -> Path:
        """Write the resolved configuration as config.json and config.toml."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        (directory / "config.toml").write_text(to_toml(self.to_dict()))
        return directory / "config.json"


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then a pipeline TOML (or JSON) file, then CLI overrides."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"Pipeline config {str(path)!r} does not exist. "
                f"Pass a TOML file such as pipelines/quickstart.toml."
            )
        try:
            if path.suffix == ".json":
                data = json.loads(path.read_text())
            else:
                data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is not valid {path.suffix[1:].upper() or 'TOML'}: {exc}") from None
        config = Config.from_dict(data, source=str(path))
    if overrides:
        config = config.with_overrides(overrides)
    return config


def merge(target: Any, data: dict, *, source: str, prefix: str = "") -> None:
    """Set fields of a dataclass from a mapping, checking names and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}] must be a table, got {type(data).__name__}.")
    hints = typing.get_type_hints(type(target))
    names = [f.name for f in dataclasses.fields(target)]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            hint = closest(key, names)
            message = f"{source}: unknown key {dotted!r}."
            if hint:
                message += f" Did you mean {prefix + hint!r}?"
            message += f" Valid keys here: {', '.join(names)}."
            raise ConfigError(message)
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            merge(current, value, source=source, prefix=f"{dotted}.")
            continue
        setattr(target, key, coerce(value, hints[key], dotted, source))


def coerce(value: Any, expected: Any, dotted: str, source: str) -> Any:
    """Accept a value of the field's type (ints for floats too), else fail clearly."""
    options = typing.get_args(expected) if typing.get_origin(expected) is Union else (expected,)
    for option in options:
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is str and isinstance(value, str):
            return value
        if option is list and isinstance(value, (list, tuple)):
            return list(value)
        if option is list and isinstance(value, str):  # "a,b" from the CLI
            return [v.strip() for v in value.split(",") if v.strip()]
        if option is dict and isinstance(value, dict):
            return dict(value)
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(
        f"{source}: {dotted} must be {wanted}, got {type(value).__name__} {value!r}."
    )


def check_choice(value: str, choices: tuple, dotted: str) -> None:
    if value not in choices:
        hint = closest(value, choices)
        message = f"{dotted} = {value!r} is not valid; expected one of: {', '.join(choices)}."
        if hint:
            message += f" Did you mean {hint!r}?"
        raise ConfigError(message)


def validate(config: Config) -> None:
    """Check values that a type alone cannot (choices and ranges)."""
    check_choice(config.data.resize_policy, RESIZE_POLICIES, "data.resize_policy")
    check_choice(config.train.strategy, STRATEGIES, "train.strategy")
    check_choice(config.train.optimizer, OPTIMIZERS, "train.optimizer")
    check_choice(config.train.schedule, SCHEDULES, "train.schedule")
    check_choice(config.backbone.pooling, POOLINGS, "backbone.pooling")
    check_choice(config.head.kind, HEAD_KINDS, "head.kind")
    if config.head.kind in FEWSHOT_HEADS and config.train.strategy not in ("bottleneck", "metric"):
        raise ConfigError(f"head.kind = {config.head.kind!r} needs train.strategy = 'bottleneck' or 'metric' (it is fitted on "
                          f"cached features, not by gradients); got {config.train.strategy!r}.")
    if config.head.neighbors < 1 or not 0.0 <= config.head.shrinkage <= 1.0 or config.head.temperature <= 0:
        raise ConfigError(f"head.neighbors must be >= 1, head.shrinkage in [0, 1] and head.temperature > 0; got "
                          f"{config.head.neighbors}, {config.head.shrinkage}, {config.head.temperature}.")
    check_choice(config.train.mixed_precision, PRECISIONS, "train.mixed_precision")
    check_choice(config.train.distribute, DISTRIBUTE, "train.distribute")
    check_choice(config.train.calibration, CALIBRATIONS, "train.calibration")
    check_choice(config.train.ood, OODS, "train.ood")
    check_choice(config.features.dtype, ("float32", "float16"), "features.dtype")
    check_choice(config.features.runtime, ("keras", "onnxruntime", "tflite"), "features.runtime")
    check_choice(config.predict.runtime, ("keras", "onnxruntime", "tflite"), "predict.runtime")
    check_choice(config.predict.precision, ("fp32", "int8"), "predict.precision")
    if config.predict.precision == "int8" and config.predict.runtime == "tflite":
        raise ConfigError("predict.precision = 'int8' runs ONNX Runtime on a quantised copy; drop --runtime tflite, "
                          "or use --precision fp32.")
    check_choice(config.features.precision, ("fp32", "bf16", "int8"), "features.precision")
    if config.features.precision != "fp32" and config.features.runtime != "keras":
        raise ConfigError(f"features.precision = {config.features.precision!r} picks its own runtime (bf16: Keras, "
                          f"int8: ONNX Runtime quantised); drop --runtime, or use --precision fp32.")
    if config.features.precision != "fp32" and config.engine.name == "ray":
        raise ConfigError(f"features.precision = {config.features.precision!r} works with the local engine only: "
                          f"drop --engine ray, or use --precision fp32 with it.")
    check_choice(config.engine.name, ENGINES, "engine.name")
    if config.engine.num_workers < 1:
        raise ConfigError(f"engine.num_workers must be at least 1, got {config.engine.num_workers}.")
    if config.engine.cpus_per_worker < 0 or config.engine.gpus_per_worker < 0:
        raise ConfigError("engine.cpus_per_worker and engine.gpus_per_worker must be 0 or more.")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(config.data, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{name} must be in [0, 1), got {value}.")
    if config.data.val_fraction + config.data.test_fraction >= 1.0:
        raise ConfigError("data.val_fraction + data.test_fraction must leave some images for training (< 1).")
    if isinstance(config.data.class_weights, str) and config.data.class_weights not in ("balanced", "none"):
        raise ConfigError(
            f"data.class_weights = {config.data.class_weights!r}: expected 'balanced', 'none' "
            "or a table of class name = weight."
        )
    if config.backbone.input_size and config.backbone.input_size < 32:
        raise ConfigError(f"backbone.input_size must be at least 32 pixels, got {config.backbone.input_size}.")
    for section in ("train", "data"):
        if getattr(config, section).batch_size < 1:
            raise ConfigError(f"{section}.batch_size must be a positive integer, got "
                              f"{getattr(config, section).batch_size}.")
    check_range(config, "train.learning_rate", 0.0, None, low_open=True)
    check_range(config, "train.finetune_lr_factor", 0.0, 1.0, low_open=True, high_open=True,
                why="phase 2 runs at learning_rate x this factor, so it must lower the rate")
    check_range(config, "train.label_smoothing", 0.0, 1.0, high_open=True)
    check_range(config, "train.focal_gamma", 0.0, None)
    check_range(config, "train.momentum", 0.0, 1.0, high_open=True)
    check_range(config, "train.weight_decay", 0.0, None)
    check_range(config, "train.step_factor", 0.0, 1.0, low_open=True)
    check_range(config, "train.ema_momentum", 0.0, 1.0, high_open=True)
    check_range(config, "train.mixup", 0.0, None)
    check_range(config, "train.cutmix", 0.0, None)
    check_range(config, "train.lr_decay_per_block", 0.0, 1.0, low_open=True,
                why="deeper blocks learn at the rate times this factor per block, so it must not raise it")
    check_range(config, "head.dropout", 0.0, 1.0, high_open=True)
    for dotted in ("train.epochs", "train.finetune_epochs", "train.unfreeze_blocks", "train.unfreeze_layers",
                   "train.warmup_epochs", "train.early_stopping_patience", "features.augment_views",
                   "train.calibration_oof_below"):
        check_range(config, dotted, 0, None)
    for dotted in ("train.step_every", "data.max_pixels", "serve.max_batch_size",
                   "serve.max_images", "serve.max_body_bytes", "serve.workers", "serve.top_k", "predict.top_k",
                   "predict.batch_size", "serve.image_pixels", "serve.inflight_pixels", "serve.max_connections"):
        check_range(config, dotted, 1, None)
    check_range(config, "serve.max_pixels", 0, None)
    check_range(config, "predict.max_pixels", 0, None)
    for dotted in ("predict.tta", "export.tta"):
        check_range(config, dotted, 1, TTA_VIEWS, why="views: the image, its flip, 5 crops and their 5 flips; "
                    "1 = a single pass")
    check_range(config, "serve.grpc_port", 0, 65535)
    check_range(config, "serve.header_timeout_s", 0.0, None, low_open=True)
    check_range(config, "serve.body_timeout_s", 0.0, None, low_open=True)
    check_range(config, "serve.batch_timeout_ms", 0.0, None)
    check_range(config, "serve.poll_seconds", 0.0, None, low_open=True)
    check_range(config, "serve.port", 0, 65535)
    sizes = config.serve.allowed_batch_sizes
    if sizes and (not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes)
                  or list(sizes) != sorted(set(sizes)) or sizes[-1] != config.serve.max_batch_size):
        raise ConfigError(f"serve.allowed_batch_sizes must be increasing positive integers ending at "
                          f"serve.max_batch_size ({config.serve.max_batch_size}), as in TF Serving's batching "
                          f"config, e.g. [1, 2, 4, 8, 16, {config.serve.max_batch_size}]; got {list(sizes)!r}.")
    if any(v < 1 for v in config.head.units) or not all(isinstance(v, int) for v in config.head.units):
        raise ConfigError(f"head.units must be a list of positive integers (e.g. [256]), got {config.head.units!r}.")
    background = config.data.background
    if (not isinstance(background, (list, tuple)) or len(background) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in background)):
        raise ConfigError(f"data.background must be three integers 0..255 (an RGB colour such as [255, 255, 255]), "
                          f"got {background!r}.")


def ignored_by_strategy(config: Config) -> list[str]:
    """Fine-tuning-only train.* settings changed from their defaults in a run that does not fine-tune
    (they would silently do nothing): "key = value" for each."""
    if config.train.strategy == "finetune":
        return []
    defaults = TrainConfig()
    return [f"train.{key} = {getattr(config.train, key)!r}" for key in FINETUNE_ONLY
            if getattr(config.train, key) != getattr(defaults, key)]


def check_range(config: Config, dotted: str, low, high, *, low_open: bool = False, high_open: bool = False,
                why: str = "") -> None:
    """A number inside its allowed interval, or an error naming the key, the value and the interval."""
    section, _, key = dotted.partition(".")
    value = getattr(getattr(config, section), key)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        interval = (("(" if low_open else "[") + f"{low}, " + (f"{high}" if high is not None else "inf")
                    + (")" if high_open or high is None else "]"))
        raise ConfigError(f"{dotted} = {value!r} is out of range; allowed: {interval}" + (f" ({why})" if why else "")
                          + ".")


def to_toml(data: dict, prefix: str = "") -> str:
    """A small TOML writer for the resolved config (tables of scalars and lists)."""
    lines: list[str] = []
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {toml_value(value)}")
    out = "\n".join(lines)
    for key, value in tables:
        name = f"{prefix}{key}"
        body = to_toml(value, prefix=f"{name}.")
        out += f"\n\n[{name}]\n{body}" if body else f"\n\n[{name}]"
    return out.strip() + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
