"""tl_app.insight.feature_map's 2-D maps with this process's backbone Extractor (for library callers).

The command line calls feature_map itself, with an extractor made only when the
cache lacks an image, so a fully cached ``tl-app embed`` never imports TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

from tl_app.features.extract import Extractor
from tl_app.insight.feature_map import METHODS, project, silhouette  # noqa: F401  (re-exported)
from tl_app.insight.feature_map import embed as map_features


def embed(source: str | Path, method: str = "pca", out: str | Path = "embedding.png", config=None,
          seed: int = 0, echo=print, extractor_class=None, space: str = "auto") -> dict:
    """feature_map.embed with this process's Extractor unless another is handed in."""
    return map_features(source, method, out, config, seed, echo, extractor_class=extractor_class or Extractor,
                        space=space)
