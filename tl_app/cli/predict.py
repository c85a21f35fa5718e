"""tl-app predict: batch inference over files, folders and globs."""

from __future__ import annotations
import json
import click
from tl_app.cli.common import build_config, engine_options, engine_overrides, load_api, pipeline_options


@click.command()
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", default=None, help="preds.csv or preds.jsonl (default: CSV on stdout).")
@click.option("--top-k", "-k", type=int, default=None, help="Classes per image (default 5).")
@click.option("--batch-size", "-b", type=int, default=None, help="Images per model call (default 32).")
@click.option("--max-pixels", type=int, default=None,
              help="Pixels per image beyond which a file is refused (default: the model's data.max_pixels).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run: keep the rows --out already holds, predict only the rest.")
@click.option("--runtime", type=click.Choice(["keras", "onnxruntime", "tflite"]), default=None,
              help="Where the model runs (default keras). onnxruntime, tflite: converted once, kept beside the "
                   "model, used only if it matches Keras (top-1, probabilities and OOD score within 1e-4).")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default=None,
              help="fp32 (default), or int8: ONNX Runtime on a statically quantised copy, calibrated on the first of "
                   "your images and used only if it agrees with fp32 on at least 99% of the top-1 classes (and "
                   "unknown verdicts) of the rest; otherwise refused with the measured agreement.")
@click.option("--tta", type=int, default=None, metavar="N",
              help="Test-time augmentation: average the probabilities over N views (1-12, in this order: the "
                   "image, its horizontal flip, 5 crops, their 5 flips; default 1 = a single pass). The OOD "
                   "score stays the image's own.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (on stderr).")
@engine_options
@pipeline_options
def predict(model, inputs, out, top_k, batch_size, max_pixels, resume, runtime, precision, tta, quiet, as_json,
            pipeline, sets, **engine):
    """Classify images: files, folders (recursive) and globs; bad files are reported, not fatal.

    MODEL is saved_models/<name> (its newest version), a version folder or a run directory.

    \b
    Examples:
      tl-app predict saved_models/flowers photos/ --out preds.csv
      tl-app predict saved_models/flowers/3 'shots/**/*.jpg' --top-k 3 --out preds.jsonl
      tl-app predict saved_models/flowers photos/ --out preds.csv --resume   # after an interrupted run
      tl-app predict saved_models/flowers photos/ --out preds.csv --runtime onnxruntime
      tl-app predict saved_models/flowers photos/ --out preds.csv --precision int8
      tl-app predict saved_models/flowers photos/ --out preds.csv --tta 5   # image, flip and 3 crops averaged
      tl-app predict saved_models/flowers /data/photos --out preds.csv --engine ray --address auto
    """
    config = build_config(pipeline, sets, **{"predict.top_k": top_k, "predict.batch_size": batch_size,
                                             "predict.max_pixels": max_pixels, "predict.runtime": runtime,
                                             "predict.precision": precision, "predict.tta": tta,
                                             "predict.progress": False if quiet else None},
                          **engine_overrides(engine))
    api = load_api()

    summary = api.predict(config, model, inputs, out=out, echo=click.echo, resume=resume)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str), err=True)
        return
    click.echo(f"predicted {summary['predicted']} image(s) in {summary['seconds']:.1f}s "
               f"({summary['images_per_second']:.1f} images/s) with {summary['model']}"
               + (f"; rows in {summary['out']}" if summary["out"] else "")
               + (f"; skipped {summary['skipped']} already in it" if summary.get("skipped") else ""), err=True)
    if summary["bad"]:
        click.echo(f"{summary['bad']} file(s) could not be used (listed with reasons in the output):", err=True)
        for item in summary["bad_files"][:20]:
            click.echo(f"  {item['path']}: {item['reason']}", err=True)
        if summary["bad"] > 20:
            click.echo(f"  ... and {summary['bad'] - 20} more", err=True)


COMMANDS = [predict]
