"""tl-app evaluate: metrics, confusion matrix and top losses."""

from __future__ import annotations
import click
from tl_app.cli.common import build_config, echo_json, load_api, pipeline_options


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
@click.option("--ood-folder", type=click.Path(), default=None,
              help="Images from none of the model's classes: AUROC and false acceptances of Mahalanobis "
                   "(backbone features) vs max-softmax against the evaluated split.")
@click.option("--tta", type=int, default=None, metavar="N",
              help="Test-time augmentation: average the probabilities over N views (1-12, in this order: the "
                   "image, its horizontal flip, 5 crops, their 5 flips; default predict.tta = 1, one pass).")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json instead of the table.")
@click.option("--episodes", type=int, default=None,
              help="Few-shot mode: N-way K-shot episodes on the model's backbone features (e.g. 600).")
@click.option("--way", type=int, default=5, show_default=True, help="Few-shot mode: classes per episode.")
@click.option("--shot", "shots", default="1,5,10", show_default=True,
              help="Few-shot mode: support images per class, comma-separated.")
@click.option("--queries", type=int, default=15, show_default=True, help="Few-shot mode: query images per class.")
@pipeline_options
def evaluate(model, data, split, out_dir, top_k, top_losses, batch_size, ood_folder, tta, as_json, episodes, way,
             shots, queries, pipeline, sets):
    """Accuracy, per-class metrics, confusion matrix and top losses of a model on a folder.

    \b
    MODEL: a run directory (runs/<name>) or an exported model folder.
    DATA:  an image folder with class sub-folders (default: the run's training data).
    \b
    Writes metrics.json, predictions.csv, confusion_matrix{,_normalized}.{csv,png},
    top_losses.png, reliability_diagram.png and skipped.csv. Bad files are listed, never fatal.
    Calibration (ECE over 15 bins, MCE, NLL, Brier) is reported before and after the
    temperature training fitted.
    \b
    Examples:
      tl-app evaluate runs/flowers
      tl-app evaluate saved_models/flowers holdout/ --split all --out eval/
      tl-app evaluate runs/flowers --tta 5       # averaged over the image, its flip and 3 crops
      tl-app evaluate runs/flowers --episodes 600 --way 5 --shot 1,5,10
    """
    config = build_config(pipeline, sets, **{"predict.tta": tta})
    api = load_api()
    if episodes is not None:
        report = api.fewshot_episodes(model, data, episodes=episodes, way=way, shots=shots, queries=queries,
                                      echo=None if as_json else click.echo)
        if as_json:
            echo_json(report)
        return

    metrics = api.evaluate(model, data, split=split, out_dir=out_dir, top_k=top_k, batch_size=batch_size,
                             top_losses=top_losses, ood_folder=ood_folder, echo=None if as_json else click.echo,
                             tta=config.predict.tta)
    if as_json:
        echo_json(metrics)


COMMANDS = [evaluate]
