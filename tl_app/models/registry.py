"""What tl-app knows about each backbone, as plain data: names, sizes, preprocessing, weight files.

Kept apart from ``backbones`` (which adds the keras.applications constructors
and layers) so that choosing a backbone, checking a name or computing a
feature-cache key never imports TensorFlow: a fully cached re-run stays
instant, and a mistyped name is refused in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from tl_app.core.errors import ConfigError, unknown_choice

KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class BackboneInfo:
    """One keras.applications backbone, without its constructor."""

    name: str
    application: str  # the keras.applications class, e.g. "ResNet50"
    preprocess: str  # "caffe" (BGR, mean subtracted) or "tf" (scaled to [-1, 1])
    default_size: int
    min_size: int
    feature_width: int
    blocks: tuple[str, ...]  # layer-name prefixes, from the top block down
    last_conv_layer: str  # for Grad-CAM
    params: int  # without the classification top
    weights_file: str  # the Keras cache file name of the ImageNet "notop" weights
    weights_md5: str
    weights_url: str

    @property
    def weights_origin(self) -> str:
        return self.weights_url + self.weights_file


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
        weights_md5=md5,
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
        weights_md5=md5,
        weights_url=KERAS_APPS + f"{name}/",
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
    )
}


def registry_key(name: str) -> str:
    """``ResNet-50``, ``resnet_50`` and ``resnet50`` name the same backbone."""
    return str(name).lower().replace("-", "").replace("_", "")


def get_info(name: str) -> BackboneInfo:
    """The registry entry for a name; unknown names list the valid ones and the closest match."""
    key = registry_key(name)
    if key not in BACKBONES:
        raise ConfigError(unknown_choice("backbone", name, BACKBONES))
    return BACKBONES[key]


def resolve_input_size(spec: BackboneInfo, input_size: int = 0) -> int:
    size = int(input_size or spec.default_size)
    if size < spec.min_size:
        raise ConfigError(
            f"{spec.name} needs an input size of at least {spec.min_size} pixels, got {size}. "
            f"Use --input-size {spec.min_size} or more (default {spec.default_size})."
        )
    return size
