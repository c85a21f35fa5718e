"""tl-app extract: bottleneck features for every usable image, cached and exported."""

from __future__ import annotations

import click

from tl_app.cli.common import require_data_folder, build_config, echo_json, engine_options, engine_overrides, load_api, pipeline_options

FORMAT_HELP = """\b
Output (load it with numpy alone):
  OUT/features.npy  [N, D] float32 (or float16); row i = line i of index.csv
  OUT/index.csv     row,path,relpath,label,label_index,split,sha256,...,view_row
  OUT/views.npy     with --augment-views K: [T, K, D] views of training images
  OUT/meta.json     classes, shape, dtype, backbone, weights fingerprint, input
                    size, resize policy, preprocessing, layer, pooling
  OUT/skipped.csv   files that could not be used, with the reason

\b
  import csv, numpy as np
  X = np.load("OUT/features.npy")
  rows = list(csv.DictReader(open("OUT/index.csv")))

\b
The cache (--cache-dir, default .cache/features) is keyed by image content
hash, backbone, weights fingerprint, input size, resize policy,
preprocessing, layer, pooling and format version: a re-run computes only
what is missing, and an interrupted run resumes.
"""


@click.command(epilog=FORMAT_HELP)
@click.argument("data", required=False, type=click.Path())
@click.option("--backbone", "-b", default=None, help="See 'tl-app backbones'.")
@click.option("--weights", default=None, help="imagenet | none | PATH to a weight file.")
@click.option("--input-size", type=int, default=None, help="Square input size (default: the backbone's).")
@click.option("--layer", default=None, help="Take features from this backbone layer (default: the last block).")
@click.option("--pooling", type=click.Choice(["avg", "max", "flatten"]), default=None,
              help="How spatial feature maps become vectors (default avg).")
@click.option("--resize-policy", default=None, help="auto | stretch | center_crop | letterbox")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default runs/features-<backbone>/features).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="dtype of features.npy (the cache always keeps float32).")
@click.option("--augment-views", type=int, default=None,
              help="Also store K augmented views per training image ([augment] settings).")
@click.option("--batch-size", type=int, default=None)
@click.option("--runtime", type=click.Choice(["keras", "onnxruntime", "tflite"]), default=None,
              help="Where the backbone runs (default keras). onnxruntime, tflite (XNNPACK): converted once, kept next to the "
                   "cache and used only if it matches Keras within 1e-4; the cache is shared.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "int8"]), default=None,
              help="Arithmetic of the backbone (default fp32). bf16: Keras mixed_bfloat16; int8: ONNX Runtime "
                   "quantised. Either is refused unless its features keep a cosine >= 0.999 with fp32; its "
                   "features are cached apart.")
@click.option("--cache-dir", default=None, help="Feature cache folder (default .cache/features).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary at the end.")
@engine_options
@pipeline_options
def extract(data, backbone, weights, input_size, layer, pooling, resize_policy, out_dir, dtype, augment_views,
            batch_size, runtime, precision, cache_dir, as_json, pipeline, sets, **engine):
    """Compute bottleneck features for every usable image of DATA.

    \b
    Examples:
      tl-app extract datasets/sample --backbone vgg16 --out feats/
      tl-app extract photos/ -b resnet50 --layer conv4_block6_out --pooling max --json
      tl-app extract photos/ -b resnet50 --augment-views 4 --dtype float16
      tl-app extract photos/ -b resnet50 --runtime onnxruntime
      tl-app extract photos/ -b resnet50 --precision int8
    """
    config = build_config(pipeline, sets, **{
        "data.root": data, "backbone.name": backbone, "backbone.weights": weights,
        "backbone.input_size": input_size, "backbone.layer": layer, "backbone.pooling": pooling,
        "data.resize_policy": resize_policy, "features.out": out_dir, "features.dtype": dtype,
        "features.augment_views": augment_views, "data.batch_size": batch_size,
        "features.cache_dir": cache_dir, "features.runtime": runtime, "features.precision": precision,
        **engine_overrides(engine),
    })
    require_data_folder(config.data.root)
    # TensorFlow loads (through the api, in backbone_extractor) only when an image is missing from the cache
    from tl_app.features.gather import default_out_dir, extract_features  # lazy: numpy only
    from tl_app.features.store import export_paths  # lazy: numpy only

    out = default_out_dir(config)
    result = extract_features(config, out_dir=out, echo=None if as_json else click.echo,
                              extractor_class=backbone_extractor)
    if as_json:
        echo_json({**result.stats, "out_dir": str(out), "outputs": export_paths(out),
                   "skipped_files": [{"path": s.path, "reason": s.reason} for s in result.skipped]})
    else:
        click.echo(f"features: {out / 'features.npy'} {tuple(result.features.shape)} "
                   f"({result.stats['dtype']}), index: {out / 'index.csv'}")


def backbone_extractor(config, recipe):
    """The api's extractor (this process or Ray), made only when the cache lacks an image."""
    return load_api().backbone_extractor(config)(config, recipe)


COMMANDS = [extract]
