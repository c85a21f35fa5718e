"""Exact and near-duplicate images: the perceptual hash, and the pairs that leak across splits.

A difference hash (dHash, 64 bits: is each pixel of a 9x8 grayscale thumbnail
darker than its right neighbour) survives resizing, re-encoding and light
crops, which is how the same photo usually reaches a dataset twice. Pairs
within ``NEAR_DISTANCE`` bits are found by banding (two hashes that close
share one of ``NEAR_DISTANCE + 1`` bands exactly), not by comparing all pairs.
"""

from __future__ import annotations

from PIL import Image

NEAR_DISTANCE = 6  # bits of 64
FLAT_BITS = 3  # a hash with this few (or this many less than 64) set bits is a flat image: not compared


def dhash(image: Image.Image) -> str:
    """The 64-bit difference hash of an opened image, as 16 hex digits."""
    small = image.convert("L").resize((9, 8), Image.BILINEAR)
    pixels = list(small.getdata())
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (pixels[row * 9 + col] > pixels[row * 9 + col + 1])
    return f"{bits:016x}"


def distance(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def informative(value: str) -> bool:
    ones = bin(int(value, 16)).count("1")
    return FLAT_BITS < ones < 64 - FLAT_BITS


def near_pairs(hashes: dict[str, str], limit: int = NEAR_DISTANCE) -> list[tuple[str, str, int]]:
    """(key a, key b, distance) for every pair of different keys whose hashes are within ``limit`` bits."""
    bands = limit + 1
    edges = [round(64 * i / bands) for i in range(bands + 1)]
    keys = sorted(k for k, v in hashes.items() if v and informative(v))
    values = {k: int(hashes[k], 16) for k in keys}
    found: dict[tuple[str, str], int] = {}
    for band in range(bands):
        width = edges[band + 1] - edges[band]
        buckets: dict[int, list[str]] = {}
        for key in keys:
            buckets.setdefault((values[key] >> edges[band]) & ((1 << width) - 1), []).append(key)
        for members in buckets.values():
            for i, a in enumerate(members):
                for b in members[i + 1:]:
                    if (a, b) not in found:
                        d = bin(values[a] ^ values[b]).count("1")
                        if d <= limit:
                            found[(a, b)] = d
    return [(a, b, d) for (a, b), d in sorted(found.items())]


def components(pairs: list[tuple[str, str, int]]) -> dict[str, str]:
    """key -> the smallest key of its connected group (union-find over the pairs)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for a, b, _ in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {key: find(key) for key in {k for a, b, _ in pairs for k in (a, b)}}
