"""The weight-fingerprint memo never answers for a file that changed (feature-cache keys rest on it)."""

from __future__ import annotations

import os

import h5py
import numpy as np

from tl_app.models.backbones import get_spec
from tl_app.models.weights import fingerprint


def write_weights(path, value: float) -> None:
    with h5py.File(path, "w") as handle:
        handle["w"] = np.full((64,), value, np.float32)


def test_a_file_rewritten_in_place_with_its_size_and_mtime_restored_is_hashed_again(tmp_path):
    spec = get_spec("vgg16")
    weights = tmp_path / "mine.weights.h5"
    write_weights(weights, 1.0)
    first = fingerprint(spec, str(weights), memo_dir=tmp_path / "memo")
    assert fingerprint(spec, str(weights), memo_dir=tmp_path / "memo") == first  # remembered
    stat = weights.stat()
    with h5py.File(weights, "r+") as handle:  # same size, other numbers
        handle["w"][...] = np.full((64,), 2.0, np.float32)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or `touch -r` would leave it
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    second = fingerprint(spec, str(weights), memo_dir=tmp_path / "memo")
    assert second != first and second == fingerprint(spec, str(weights))  # the memo agrees with a fresh hash
