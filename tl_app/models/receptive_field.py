"""Receptive-field arithmetic: which input pixels one position of a convolutional layer sees.

Maximal-activation patches crop this region from the image. The walk follows the
Keras graph from the input to the chosen layer; each spatial layer changes three
numbers (the jump between neighbouring outputs, the field's size, the centre of
output 0), the textbook recurrence (Dumoulin & Visin; Araujo et al.). "same"
padding is resolved from the real input sizes, as TensorFlow pads: the extra
pixel goes after, not before. Where branches merge (ResNet's Add), the widest
field is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from tl_app.core.errors import ConfigError, unknown_choice


@dataclass(frozen=True)
class Field:
    """Per axis (height, width): jump in input pixels, field size, centre of output 0 (input pixel index)."""

    jump: tuple[float, float] = (1.0, 1.0)
    size: tuple[float, float] = (1.0, 1.0)
    start: tuple[float, float] = (0.0, 0.0)

    def box(self, row: int, col: int, height: int, width: int) -> tuple[float, float, float, float]:
        """(top, left, bottom, right) in input pixels, end exclusive, clipped to the input."""
        out = []
        for axis, index, limit in ((0, row, height), (1, col, width)):
            centre = self.start[axis] + index * self.jump[axis]
            low = centre - (self.size[axis] - 1) / 2
            out.append((max(0.0, low), min(float(limit), low + self.size[axis])))
        (top, bottom), (left, right) = out
        return top, left, bottom, right


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _spatial(shape) -> tuple[int, int]:
    return int(shape[1]), int(shape[2])


def _window(layer) -> tuple[tuple[int, int], tuple[int, int], str, tuple[int, int]] | None:
    """(kernel, strides, padding, dilation) of a layer that moves pixels, None for point-wise layers."""
    from keras import layers

    if isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D)):
        return _pair(layer.kernel_size), _pair(layer.strides), layer.padding, _pair(layer.dilation_rate)
    if isinstance(layer, (layers.MaxPooling2D, layers.AveragePooling2D)):
        return _pair(layer.pool_size), _pair(layer.strides), layer.padding, (1, 1)
    return None


def _step(field: Field, layer, in_shape) -> Field:
    from keras import layers

    if isinstance(layer, layers.ZeroPadding2D):
        (top, _), (left, _) = layer.padding
        return Field(field.jump, field.size,
                     (field.start[0] - top * field.jump[0], field.start[1] - left * field.jump[1]))
    window = _window(layer)
    if window is None:
        if isinstance(layer, (layers.Conv1D, layers.Conv3D, layers.Conv2DTranspose, layers.UpSampling2D,
                              layers.Cropping2D, layers.Resizing, layers.Flatten, layers.GlobalAveragePooling2D,
                              layers.GlobalMaxPooling2D)):
            raise ConfigError(f"Layer {layer.name!r} ({type(layer).__name__}) has no receptive field tl-app can "
                              f"compute: choose a convolutional layer before it (--layer).")
        return field
    kernel, strides, padding, dilation = window
    jump, size, start = [], [], []
    for axis in (0, 1):
        effective = (kernel[axis] - 1) * dilation[axis] + 1
        pad_before = 0
        if padding == "same":
            length = in_shape[axis]
            out = -(-length // strides[axis])
            pad_before = max((out - 1) * strides[axis] + effective - length, 0) // 2
        jump.append(field.jump[axis] * strides[axis])
        size.append(field.size[axis] + (effective - 1) * field.jump[axis])
        start.append(field.start[axis] + ((effective - 1) / 2 - pad_before) * field.jump[axis])
    return Field(tuple(jump), tuple(size), tuple(start))


def receptive_field(model, layer_name: str) -> Field:
    """The receptive field of ``layer_name``'s outputs in ``model``'s input pixels (a functional model)."""
    names = [layer.name for layer in model.layers]
    if layer_name not in names:
        raise ConfigError(unknown_choice(f"layer of {model.name}", layer_name, names))
    fields: dict[str, Field] = {}
    for layer in model.layers:
        parents = [p.operation.name for p in layer._inbound_nodes[0].parent_nodes] if layer._inbound_nodes else []
        known = [fields[p] for p in parents if p in fields]
        field = max(known, key=lambda f: f.size[0] * f.size[1]) if known else Field()
        inputs = layer.input if parents else None
        if isinstance(inputs, (list, tuple)):
            inputs = inputs[0]
        shape = _spatial(inputs.shape) if inputs is not None and len(inputs.shape) == 4 else (0, 0)
        fields[layer.name] = _step(field, layer, shape) if parents else field
        if layer.name == layer_name:
            return fields[layer.name]
    raise ConfigError(f"Layer {layer_name!r} is not reached from the input of {model.name}.")


def spatial_layers(model) -> list[str]:
    """Names of the layers with a 4-D (N, H, W, C) output: the ones patches can be drawn for."""
    return [layer.name for layer in model.layers if len(getattr(layer.output, "shape", ())) == 4
            and type(layer).__name__ != "InputLayer"]
