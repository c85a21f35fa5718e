"""The rules that decide an image's pixels, as plain values: the resize policy and the decoder's version.

Feature-cache keys are built from them, and a fully cached re-run builds its
key without importing TensorFlow, so they live here rather than in the tf.data
modules (``pipeline``, ``decode``) that apply them.
"""

from __future__ import annotations

DEFAULT_RESIZE_POLICY = "center_crop"  # how the ImageNet backbones were evaluated
DECODER_RULE = "decode-1: jpeg accurate idct + exif; png alpha/trns composite round; 16-bit gray by mode"


def effective_policy(policy: str) -> str:
    """Resolve "auto" to the policy the backbones were trained/evaluated with."""
    return DEFAULT_RESIZE_POLICY if policy in ("", "auto") else policy
