"""tl-app embed: a 2-D map of the features (PCA, t-SNE)."""

from __future__ import annotations
import click
from tl_app.cli.extract import backbone_extractor
from tl_app.cli.common import echo_json, feature_config, feature_options, pipeline_options


@click.command()
@click.argument("source", type=click.Path())
@click.option("--method", type=click.Choice(["pca", "tsne"]), default="pca", show_default=True)
@click.option("--out", default="embedding.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--space", type=click.Choice(["auto", "features", "embeddings"]), default="auto", show_default=True,
              help="For a metric run (train --strategy metric) or its export: its learned embeddings (auto, "
                   "embeddings) or the backbone features.")
@feature_options
@click.option("--json", "as_json", is_flag=True)
@pipeline_options
def embed(source, method, out, space, backbone, weights, input_size, layer, cache_dir, as_json, pipeline, sets):
    """2-D map (PCA or t-SNE) of image features, coloured by class.

    \b
    SOURCE: a feature folder (tl-app extract), a similarity index (tl-app index),
    a run folder or an exported model (its backbone and recipe, on the data it
    trained on), or an image folder (features come from the bottleneck cache).
    \b
    Examples:
      tl-app embed runs/flowers/features --method tsne --out tsne.png
      tl-app embed datasets/sample --backbone resnet50 --out pca.png
      tl-app embed runs/flowers --out pca.png
      tl-app embed runs/metric --space features --out before.png
    """
    config = feature_config(pipeline, sets, None, backbone, weights, input_size, layer, cache_dir)
    # TensorFlow loads (through the api) only when an image is missing from the feature cache, as in extract
    from tl_app.insight.feature_map import embed as map_features  # lazy: numpy, scikit-learn, matplotlib

    summary = map_features(source, method, out, config=config, echo=None if as_json else click.echo,
                           extractor_class=backbone_extractor, space=space)
    if as_json:
        echo_json(summary)


COMMANDS = [embed]
