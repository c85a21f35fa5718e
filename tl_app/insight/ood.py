"""Out-of-distribution scores and how well they separate: Mahalanobis distance against max-softmax.

Measurement only (``tl-app evaluate --ood-folder``): a class-conditional
Gaussian with one shared covariance is fitted on the training split's backbone
features; an image's score is its smallest squared Mahalanobis distance to a
class mean. The baseline is 1 - max softmax probability. For both, a higher
score means "more unknown"; the threshold accepts a set fraction (95%) of the
in-distribution images, and AUROC / FPR at that acceptance say how many
outside images would still pass.
"""

from __future__ import annotations

import numpy as np

from tl_app.data.images import decode_pil
from tl_app.data.pipeline import resize_images
from tl_app.data.scan import walk

# the scorer itself lives with the models (training fits it, export carries it in the graph)
from tl_app.models.ood import ACCEPTANCE, Mahalanobis, acceptance_threshold, fit_mahalanobis  # noqa: F401,E402
from tl_app.models.ood import without_ood  # noqa: E402

SHRINKAGE = 0.1  # this measurement's fixed shrinkage (training's scorer chooses its own: models.ood)


def max_softmax_score(probabilities) -> np.ndarray:
    return 1.0 - np.max(np.asarray(probabilities, np.float64), axis=1)


def auroc(inside, outside) -> float:
    """P(an outside image scores higher than an inside one), ties counting one half (Mann-Whitney U)."""
    inside, outside = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    if not len(inside) or not len(outside):
        return float("nan")
    scores = np.concatenate([inside, outside])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    u = ranks[len(inside):].sum() - len(outside) * (len(outside) + 1) / 2
    return float(u / (len(inside) * len(outside)))


def separation(inside, outside, acceptance: float = ACCEPTANCE) -> dict:
    """AUROC, and the share of outside images accepted at the threshold that accepts ``acceptance`` inside."""
    threshold = acceptance_threshold(inside, acceptance)
    inside, outside = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    return {"auroc": auroc(inside, outside), "threshold": threshold,
            "in_accepted": float(np.mean(inside <= threshold)),
            f"fpr_at_{round(acceptance * 100)}": float(np.mean(outside <= threshold)),
            "in_images": int(len(inside)), "ood_images": int(len(outside))}


# ---- evaluate --ood-folder -------------------------------------------------------------
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def features_and_probabilities(model):
    """A model giving (backbone features, probabilities): the output of the layer that feeds the head."""
    import keras

    model = without_ood(model)
    names = [layer.name for layer in model.layers]
    if "head" not in names or names.index("head") == 0:
        return None
    features = model.layers[names.index("head") - 1].output
    return keras.Model(model.input, [features, model.output])


def folder_images(folder, input_size: int, policy: str, background, batch_size: int):
    """Batches of resized pixels for every image file below ``folder`` (undecodable files are skipped)."""
    batch, used, skipped = [], [], []
    for path, reason in walk(folder, suffixes=IMAGE_SUFFIXES):
        if reason:
            continue
        try:
            pixels = resize_images(decode_pil(path, background), input_size, policy).numpy()
        except Exception as exc:  # a bad file is reported, never fatal
            skipped.append({"path": str(path), "reason": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        batch.append(pixels)
        used.append(str(path))
        if len(batch) == batch_size:
            yield np.stack(batch).astype(np.float32), used, skipped
            batch, used, skipped = [], [], []
    if batch or skipped:
        yield (np.stack(batch).astype(np.float32) if batch else None), used, skipped


def ood_figures(model, train_dataset, train_labels_of, eval_dataset, ood_batches, scorer_record=None,
                score_fn=None) -> dict:
    """Mahalanobis (features of the training split) against max-softmax, on the evaluated split vs the folder;
    and, for a model that carries its own scorer (``score_fn``: images -> ood_score; ``scorer_record``: run.json's
    or the card's ``ood``), that scorer at the threshold it answers "unknown" with: what the model's users get.

    ``train_dataset``/``eval_dataset`` yield (images, index); ``train_labels_of`` maps indices to class numbers.
    """
    both = features_and_probabilities(model)
    if both is None:
        return {"error": "the model has no 'head' layer after its backbone features (a few-shot or foreign model)"}
    own = score_fn is not None and (scorer_record or {}).get("threshold") is not None

    def outputs(images):
        f, p = both.predict_on_batch(images)
        score = score_fn(images) if own else None
        return (np.asarray(f, np.float64), np.asarray(p, np.float64),
                np.asarray(score, np.float64).reshape(-1) if own else np.zeros(len(images)))

    def run(dataset):
        feats, probs, scores, index = [], [], [], []
        for images, idx in dataset:
            f, p, o = outputs(images)
            feats.append(f), probs.append(p), scores.append(o), index.append(np.asarray(idx))
        return np.concatenate(feats), np.concatenate(probs), np.concatenate(scores), np.concatenate(index)

    train_f, _, _, train_index = run(train_dataset)
    scorer = fit_mahalanobis(train_f, train_labels_of(train_index), SHRINKAGE)
    in_f, in_p, in_o, _ = run(eval_dataset)
    out_f, out_p, out_o, used, skipped = [], [], [], [], []
    for images, paths, bad in ood_batches:
        skipped += bad
        if images is None:
            continue
        f, p, o = outputs(images)
        out_f.append(f), out_p.append(p), out_o.append(o)
        used += paths
    if not used:
        return {"error": "no decodable image in the OOD folder", "skipped": skipped}
    out_f, out_p, out_o = np.concatenate(out_f), np.concatenate(out_p), np.concatenate(out_o)
    figures = {"mahalanobis": separation(scorer.score(in_f), scorer.score(out_f)),
               "max_softmax": separation(max_softmax_score(in_p), max_softmax_score(out_p)),
               "train_images": int(len(train_f)), "acceptance": ACCEPTANCE, "skipped": skipped}
    if own:
        threshold = float(scorer_record["threshold"])
        figures["model"] = {**separation(in_o, out_o), "method": scorer_record.get("method"),
                            "model_threshold": threshold,
                            "in_accepted_at_model_threshold": float(np.mean(in_o <= threshold)),
                            "ood_accepted_at_model_threshold": float(np.mean(out_o <= threshold))}
    figures["better"] = max([k for k in ("model", "mahalanobis", "max_softmax") if k in figures],
                            key=lambda k: figures[k]["auroc"])
    return figures


def ood_text(figures: dict | None) -> str:
    if not figures:
        return ""
    if "error" in figures:
        return f"ood: {figures['error']}"
    key = f"fpr_at_{round(figures['acceptance'] * 100)}"
    m, s = figures["mahalanobis"], figures["max_softmax"]
    return (f"ood ({m['ood_images']} images): AUROC mahalanobis {m['auroc']:.4f} vs max-softmax {s['auroc']:.4f}; "
            f"outside images accepted at {figures['acceptance']:.0%} in-distribution acceptance: "
            f"{m[key]:.4f} vs {s[key]:.4f}"
            + ("" if "model" not in figures else
               f"; the model's own scorer ({figures['model']['method']}): AUROC {figures['model']['auroc']:.4f}, "
               f"at its threshold it accepts {figures['model']['in_accepted_at_model_threshold']:.1%} of the split "
               f"and {figures['model']['ood_accepted_at_model_threshold']:.1%} of the folder"))
