"""What tl-app knows about each backbone, as plain data: names, sizes, preprocessing, weight files.

Kept apart from ``backbones`` (which adds the keras.applications constructors
and layers) so that choosing a backbone, checking a name or computing a
feature-cache key never imports TensorFlow: a fully cached re-run stays
instant, and a mistyped name is refused in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tl_app.core.errors import ConfigError, unknown_choice

KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class BackboneInfo:
    """One keras.applications backbone, without its constructor."""

    name: str
    application: str  # the keras.applications class, e.g. "ResNet50"
    preprocess: str  # "caffe" (BGR, mean subtracted), "tf" (scaled to [-1, 1]) or "raw" (see PREPROCESS_MODES)
    default_size: int
    min_size: int
    feature_width: int
    blocks: tuple[str, ...]  # layer-name prefixes, from the top block down
    last_conv_layer: str  # for Grad-CAM
    params: int  # without the classification top
    weights_file: str  # the Keras cache file name of the ImageNet "notop" weights
    weights_hash: str  # as keras.applications checks it: md5 (32 hex digits) or sha256 (64)
    weights_url: str
    # images/s at default_size, batch 32, against ResNet50 in the same run (see SPEED_VS_RESNET50)
    speed_vs_resnet50: float = 0.0

    @property
    def weights_origin(self) -> str:
        return self.weights_url + self.weights_file

    @property
    def weights_hash_algorithm(self) -> str:
        """Keras' own rule (keras.utils.get_file): a 64-digit hash is sha256, else md5."""
        return "sha256" if len(self.weights_hash) == 64 else "md5"

    @property
    def float32_mb(self) -> float:
        return round(self.params * 4 / 1e6, 1)


PREPROCESS_MODES = {
    "caffe": "RGB->BGR, minus the ImageNet channel means (VGG, ResNet v1)",
    "tf": "0..255 scaled to -1..1 (ResNet v2)",
    "raw": "0..255 RGB handed to the backbone, which normalises it with its own built-in layers "
           "(keras.applications include_preprocessing: EfficientNetV2, ConvNeXt, MobileNetV3)",
}


def _resnet(name: str, application: str, params: int, md5: str, v2: bool) -> BackboneInfo:
    return BackboneInfo(
        name=name,
        application=application,
        preprocess="tf" if v2 else "caffe",
        default_size=224,
        min_size=32,
        feature_width=2048,
        blocks=("conv5", "conv4", "conv3", "conv2", "conv1"),
        last_conv_layer="post_relu" if v2 else "conv5_block3_out",
        params=params,
        weights_file=f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weights_hash=md5,
        weights_url=KERAS_APPS + "resnet/",
    )


def _vgg(name: str, application: str, params: int, md5: str, last_conv: str) -> BackboneInfo:
    return BackboneInfo(
        name=name,
        application=application,
        preprocess="caffe",
        default_size=224,
        min_size=32,
        feature_width=512,
        blocks=("block5", "block4", "block3", "block2", "block1"),
        last_conv_layer=last_conv,
        params=params,
        weights_file=f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weights_hash=md5,
        weights_url=KERAS_APPS + f"{name}/",
    )


def _efficientnetv2(name: str, application: str, variant: str, default_size: int, params: int,
                    md5: str) -> BackboneInfo:
    return BackboneInfo(
        name=name,
        application=application,
        preprocess="raw",  # B0-B3: ImageNet mean/std; S/M/L: x/128 - 1 (keras' own layers)
        default_size=default_size,
        min_size=32,
        feature_width=1280,
        blocks=("top", "block6", "block5", "block4", "block3", "block2", "block1", "stem"),
        last_conv_layer="top_activation",
        params=params,
        weights_file=f"efficientnetv2-{variant}_notop.h5",
        weights_hash=md5,
        weights_url=KERAS_APPS + "efficientnet_v2/",
    )


def _convnext(name: str, application: str, params: int, sha256: str) -> BackboneInfo:
    """Stages top first, each downsampling layer its own block; the final LayerNormalization (unnamed in
    Keras) is named ``<name>_stage_3_final_layernorm`` by ``backbones.build_base``, so it trains with stage 3."""
    stages = []
    for i in (3, 2, 1, 0):
        stages.append(f"{name}_stage_{i}")
        stages.append(f"{name}_downsampling_block_{i - 1}" if i else f"{name}_stem")
    return BackboneInfo(
        name=name,
        application=application,
        preprocess="raw",  # ImageNet mean/std (keras' prestem Normalization)
        default_size=224,
        min_size=32,
        feature_width=768,
        blocks=tuple(stages),
        last_conv_layer=f"{name}_stage_3_final_layernorm",
        params=params,
        weights_file=f"{name}_notop.h5",
        weights_hash=sha256,
        weights_url=KERAS_APPS + "convnext/",
    )


def _mobilenetv3(name: str, application: str, size: str, expanded: int, width: int, params: int,
                 md5: str) -> BackboneInfo:
    """One block per inverted-residual block, top first; the final hard-swish activation (unnamed in
    Keras) is named ``conv_1_activation`` by ``backbones.build_base``, so Grad-CAM sees activated maps."""
    return BackboneInfo(
        name=name,
        application=application,
        preprocess="raw",  # x/127.5 - 1 (keras' Rescaling layer)
        default_size=224,
        min_size=32,
        feature_width=width,
        blocks=("conv_1", *(f"expanded_conv_{i}" for i in range(expanded, 0, -1)), "expanded_conv", "conv"),
        last_conv_layer="conv_1_activation",
        params=params,
        weights_file=f"weights_mobilenet_v3_{size}_224_1.0_float_no_top_v2.h5",
        weights_hash=md5,
        weights_url=KERAS_APPS + "mobilenet_v3/",
    )


BACKBONES: dict[str, BackboneInfo] = {
    info.name: info
    for info in (
        _vgg("vgg16", "VGG16", 14_714_688, "6d6bbae143d832006294945121d1f1fc", "block5_conv3"),
        _vgg("vgg19", "VGG19", 20_024_384, "253f8cb515780f3b799900260a226db6", "block5_conv4"),
        _resnet("resnet50", "ResNet50", 23_587_712, "4d473c1dd8becc155b73f8504c6f6626", False),
        _resnet("resnet101", "ResNet101", 42_658_176, "88cf7a10940856eca736dc7b7e228a21", False),
        _resnet("resnet152", "ResNet152", 58_370_944, "ee4c566cf9a93f14d82f913c2dc6dd0c", False),
        _resnet("resnet50v2", "ResNet50V2", 23_564_800, "fac2f116257151a9d068a22e544a4917", True),
        _resnet("resnet101v2", "ResNet101V2", 42_626_560, "c0ed64b8031c3730f411d2eb4eea35b5", True),
        _resnet("resnet152v2", "ResNet152V2", 58_331_648, "ed17cf2e0169df9d443503ef94b23b33", True),
        _efficientnetv2("efficientnetv2b0", "EfficientNetV2B0", "b0", 224, 5_919_312,
                        "893217f2bb855e2983157299931e43ff"),
        _efficientnetv2("efficientnetv2s", "EfficientNetV2S", "s", 384, 20_331_360,
                        "af0682fb74e8c54910f2d4393339c070"),
        _convnext("convnext_tiny", "ConvNeXtTiny", 27_820_128,
                  "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"),
        _convnext("convnext_small", "ConvNeXtSmall", 49_454_688,
                  "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab"),
        _mobilenetv3("mobilenetv3small", "MobileNetV3Small", "small", 10, 576, 939_120,
                     "d3e8ec802a04aa4fc771ee12a9a9b836"),
        _mobilenetv3("mobilenetv3large", "MobileNetV3Large", "large", 14, 960, 2_996_352,
                     "07fb09a5933dd0c8eaafa16978110389"),
    )
}


# Measured by `bench/bench_backbone.py --quick` (compiled forward pass on in-memory float32 tensors, each at its
# default size, batch 32, random weights, 2 timed batches) on a shared 2-core CPU (AVX2, TensorFlow 2.21,
# Keras 3.15). Each ratio is against ResNet50 measured first and last in its own run: the full run (6.94 and
# 6.35 images/s) for most; convnext_tiny (6.95/6.77), convnext_small and efficientnetv2s (7.80/7.86) from
# `--quick --backbones ...` runs on a quieter machine (load ~3), because in the full run (load 4-7) they overlapped
# a test run on the same two cores (there they read 0.08x, 0.05x, 0.18x). Rough ranks for this kind of CPU:
# re-run the bench where it matters.
SPEED_VS_RESNET50 = {
    "convnext_small": 0.11,
    "convnext_tiny": 0.16,
    "efficientnetv2b0": 1.34,
    "efficientnetv2s": 0.33,
    "mobilenetv3large": 3.44,
    "mobilenetv3small": 8.51,
    "resnet101": 0.44,
    "resnet101v2": 0.48,
    "resnet152": 0.24,
    "resnet152v2": 0.2,
    "resnet50": 1.0,
    "resnet50v2": 0.64,
    "vgg16": 0.2,
    "vgg19": 0.19,
}
BACKBONES = {name: replace(info, speed_vs_resnet50=SPEED_VS_RESNET50.get(name, 0.0)) for name, info in BACKBONES.items()}


def registry_key(name: str) -> str:
    """``ResNet-50``, ``resnet_50`` and ``resnet50`` name the same backbone."""
    return str(name).lower().replace("-", "").replace("_", "")


_BY_KEY = {registry_key(info.name): info for info in BACKBONES.values()}


def canonical_name(name: str) -> str | None:
    """The registry's own spelling of a backbone name (``ConvNeXt-Tiny`` -> ``convnext_tiny``), or None."""
    info = _BY_KEY.get(registry_key(name))
    return info.name if info is not None else None


def get_info(name: str) -> BackboneInfo:
    """The registry entry for a name; unknown names list the valid ones and the closest match."""
    canonical = canonical_name(name)
    if canonical is None:
        raise ConfigError(unknown_choice("backbone", name, BACKBONES))
    return BACKBONES[canonical]


def resolve_input_size(spec: BackboneInfo, input_size: int = 0) -> int:
    size = int(input_size or spec.default_size)
    if size < spec.min_size:
        raise ConfigError(
            f"{spec.name} needs an input size of at least {spec.min_size} pixels, got {size}. "
            f"Use --input-size {spec.min_size} or more (default {spec.default_size})."
        )
    return size
