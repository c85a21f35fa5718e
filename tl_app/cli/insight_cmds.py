"""Understanding a model: evaluate, explain, embed, index, similar, report."""

from __future__ import annotations

import click

from tl_app.cli.common import build_config, echo_json, pipeline_options


def feature_options(func):
    """The flags that choose how features are computed (backbone, weights, size, cache)."""
    func = click.option("--cache-dir", default=None, help="Bottleneck feature cache (default .cache/features).")(func)
    func = click.option("--layer", default=None, help="Backbone layer to take features from (default: last block).")(func)
    func = click.option("--input-size", type=int, default=None, help="Square input size (default: the backbone's).")(func)
    func = click.option("--weights", default=None, help="imagenet | none | PATH to a weight file.")(func)
    func = click.option("--backbone", "-b", default=None, help="See 'tl-app backbones'.")(func)
    return func


def feature_config(pipeline, sets, data, backbone, weights, input_size, layer, cache_dir):
    return build_config(pipeline, sets, **{
        "data.root": data, "backbone.name": backbone, "backbone.weights": weights,
        "backbone.input_size": input_size, "backbone.layer": layer, "features.cache_dir": cache_dir,
    })


@click.command()
@click.argument("model", type=click.Path())
@click.argument("data", required=False, type=click.Path())
@click.option("--split", type=click.Choice(["val", "test", "all", "train"]), default=None,
              help="Which images (default: val for the training folder, test or all for another folder).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default RUN_DIR/evaluation).")
@click.option("--top-k", type=int, default=5, show_default=True, help="k of the top-k accuracy.")
@click.option("--top-losses", type=int, default=16, show_default=True, help="Images on the top-losses sheet.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json instead of the table.")
def evaluate(model, data, split, out_dir, top_k, top_losses, batch_size, as_json):
    """Accuracy, per-class metrics, confusion matrix and top losses of a model on a folder.

    \b
    MODEL: a run directory (runs/<name>) or an exported model folder.
    DATA:  an image folder with class sub-folders (default: the run's training data).
    \b
    Writes metrics.json, predictions.csv, confusion_matrix{,_normalized}.{csv,png},
    top_losses.png and skipped.csv. Bad files are listed, never fatal.
    \b
    Examples:
      tl-app evaluate runs/flowers
      tl-app evaluate saved_models/flowers holdout/ --split all --out eval/
    """
    from tl_app.evaluate import evaluate as run_evaluation

    metrics = run_evaluation(model, data, split=split, out_dir=out_dir, top_k=top_k, batch_size=batch_size,
                             top_losses=top_losses, echo=None if as_json else click.echo)
    if as_json:
        echo_json(metrics)


@click.command()
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--method", type=click.Choice(["gradcam", "occlusion"]), default="gradcam", show_default=True)
@click.option("--class", "class_name", default=None, help="Explain this class (default: the top prediction).")
@click.option("--patch", type=int, default=16, show_default=True, help="Occlusion patch size in pixels.")
@click.option("--stride", type=int, default=8, show_default=True, help="Occlusion stride in pixels.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default RUN_DIR/explanations).")
@click.option("--json", "as_json", is_flag=True)
def explain(model, images, method, class_name, patch, stride, out_dir, as_json):
    """Heat maps of what a prediction rests on (Grad-CAM or occlusion), as PNG overlays.

    \b
    Examples:
      tl-app explain runs/flowers photo.jpg
      tl-app explain runs/flowers a.jpg b.jpg --method occlusion --patch 32 --stride 16
      tl-app explain runs/flowers rose.jpg --class tulips
    """
    from tl_app.explain import explain as run_explain

    summary = run_explain(model, list(images), method, class_name, patch, stride, out_dir,
                          echo=None if as_json else click.echo)
    if as_json:
        echo_json(summary)


@click.command()
@click.argument("source", type=click.Path())
@click.option("--method", type=click.Choice(["pca", "tsne"]), default="pca", show_default=True)
@click.option("--out", default="embedding.png", show_default=True, type=click.Path(dir_okay=False))
@feature_options
@click.option("--json", "as_json", is_flag=True)
@pipeline_options
def embed(source, method, out, backbone, weights, input_size, layer, cache_dir, as_json, pipeline, sets):
    """2-D map (PCA or t-SNE) of image features, coloured by class.

    \b
    SOURCE: a feature folder (tl-app extract), a similarity index (tl-app index)
    or an image folder (features come from the bottleneck cache, computed once).
    \b
    Examples:
      tl-app embed runs/flowers/features --method tsne --out tsne.png
      tl-app embed datasets/sample --backbone resnet50 --out pca.png
    """
    from tl_app.embed import embed as run_embed

    config = feature_config(pipeline, sets, None, backbone, weights, input_size, layer, cache_dir)
    summary = run_embed(source, method, out, config=config, echo=None if as_json else click.echo)
    if as_json:
        echo_json(summary)


@click.command()
@click.argument("data", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index folder to write.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage of the vectors (float16 halves the file).")
@feature_options
@click.option("--json", "as_json", is_flag=True)
@pipeline_options
def index(data, out, dtype, backbone, weights, input_size, layer, cache_dir, as_json, pipeline, sets):
    """Build an image-retrieval index from backbone features (reusing the feature cache).

    \b
    Examples:
      tl-app index datasets/sample --backbone resnet50 --out indexes/sample
      tl-app similar indexes/sample query.jpg -k 5 --out sheet.png
    """
    from tl_app.similarity import build_index

    config = feature_config(pipeline, sets, data, backbone, weights, input_size, layer, cache_dir)
    summary = build_index(config, out, dtype=dtype, echo=None if as_json else click.echo)
    if as_json:
        echo_json(summary)


@click.command()
@click.argument("index_dir", metavar="INDEX", type=click.Path())
@click.argument("queries", nargs=-1, required=True, type=click.Path())
@click.option("-k", "k", type=int, default=5, show_default=True, help="Neighbours per query.")
@click.option("--out", "sheet", type=click.Path(dir_okay=False), default=None, help="Contact sheet PNG.")
@click.option("--json", "as_json", is_flag=True, help="Results as JSON (path, label, similarity, distance).")
def similar(index_dir, queries, k, sheet, as_json):
    """The K most similar indexed images to each query image (cosine similarity).

    \b
    Examples:
      tl-app similar indexes/sample photo.jpg -k 8 --out sheet.png
      tl-app similar indexes/sample a.jpg b.jpg --json
    """
    from tl_app.similarity import similar as run_similar

    result = run_similar(index_dir, list(queries), k, sheet, echo=None if as_json else click.echo)
    if as_json:
        echo_json(result)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="HTML file (default RUN_DIR/report.html).")
@click.option("--explanations", type=int, default=3, show_default=True, help="How many images to explain.")
@click.option("--no-evaluate", is_flag=True, help="Do not evaluate the run when it has no evaluation yet.")
def report(run_dir, out, explanations, no_evaluate):
    """One self-contained HTML report of a run (images embedded): open it in any browser.

    \b
    Example:
      tl-app report runs/flowers && xdg-open runs/flowers/report.html
    """
    from tl_app.report import build_report

    build_report(run_dir, out, evaluate_missing=not no_evaluate, explanations=explanations, echo=click.echo)


COMMANDS = [evaluate, explain, embed, index, similar, report]
