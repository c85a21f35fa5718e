"""tl-app index and similar: nearest images by their features."""

from __future__ import annotations
import click
from tl_app.core.errors import ConfigError
from tl_app.cli.extract import backbone_extractor
from tl_app.cli.common import require_data_folder, require_some_used, echo_json, feature_config, feature_options, load_api, pipeline_options


@click.command()
@click.argument("data", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index folder to write.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage of the vectors (float16 halves the file).")
@click.option("--embeddings", "run", type=click.Path(), default=None,
              help="A metric run (train --strategy metric) or its export: index its learned embeddings "
                   "(its backbone, weights and size) instead of the backbone features.")
@feature_options
@click.option("--json", "as_json", is_flag=True)
@pipeline_options
def index(data, out, dtype, run, backbone, weights, input_size, layer, cache_dir, as_json, pipeline, sets):
    """Build an image-retrieval index from backbone features (reusing the feature cache).

    \b
    Examples:
      tl-app index datasets/sample --backbone resnet50 --out indexes/sample
      tl-app similar indexes/sample query.jpg -k 5 --out sheet.png
      tl-app index datasets/sample --embeddings runs/metric --out indexes/metric
    """
    config = feature_config(pipeline, sets, data, backbone, weights, input_size, layer, cache_dir)
    require_data_folder(config.data.root)
    # TensorFlow loads (through the api) only when an image is missing from the feature cache, as in extract
    from tl_app.insight.similarity_index import build_index  # lazy: numpy only

    projection = None
    if run:
        if backbone or weights or input_size or layer:
            raise click.UsageError("--embeddings takes the backbone, weights, input size and layer of the metric "
                                   "run; leave out --backbone/--weights/--input-size/--layer.")
        from tl_app.insight.feature_map import embedding_recipe  # lazy: numpy only

        config, projection = embedding_recipe(run, data, config)
    summary = build_index(config, out, dtype=dtype, echo=None if as_json else click.echo,
                          extractor_class=backbone_extractor, projection=projection, projection_source=run or "")
    if as_json:
        echo_json(summary)


@click.command()
@click.argument("index_dir", metavar="INDEX", type=click.Path())
@click.argument("queries", nargs=-1, required=True, type=click.Path())
@click.option("-k", "k", type=int, default=5, show_default=True, help="Neighbours per query.")
@click.option("--out", "sheet", type=click.Path(dir_okay=False), default=None, help="Contact sheet PNG.")
@click.option("--include-self", is_flag=True,
              help="Keep a query that is itself in the index (same content) among its neighbours.")
@click.option("--json", "as_json", is_flag=True, help="Results as JSON (path, label, similarity, distance).")
def similar(index_dir, queries, k, sheet, include_self, as_json):
    """The K most similar indexed images to each query image (cosine similarity).

    \b
    Examples:
      tl-app similar indexes/sample photo.jpg -k 8 --out sheet.png
      tl-app similar indexes/sample a.jpg b.jpg --json
    """
    if k < 1:
        raise ConfigError(f"-k must be at least 1, got {k}.")
    api = load_api()
    result = api.similar(index_dir, list(queries), k, sheet, echo=None if as_json else click.echo,
                         include_self=include_self)
    if as_json:
        echo_json(result)
    require_some_used("query images", len(result["queries"]), result["skipped"], count=not as_json)


COMMANDS = [index, similar]
