"""Unknown-input measurement: Mahalanobis on backbone features vs max-softmax (evaluate --ood-folder)."""

from __future__ import annotations

import numpy as np
import pytest

from tl_app.insight.ood import acceptance_threshold, auroc, fit_mahalanobis, separation


def test_auroc_and_acceptance_figures_on_hand_examples():
    assert auroc([0.1, 0.2, 0.3], [0.4, 0.5]) == 1.0  # every outside image scores higher
    assert auroc([0.4, 0.5], [0.1, 0.2, 0.3]) == 0.0
    assert auroc([0.1, 0.2], [0.2, 0.3]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)  # one tie counts half
    inside = np.arange(100) / 100.0  # 0.00 .. 0.99
    assert acceptance_threshold(inside) == pytest.approx(0.95)
    figures = separation(inside, np.array([0.5, 0.97, 0.99, 2.0]))
    assert figures["in_accepted"] == pytest.approx(0.96) and figures["fpr_at_95"] == pytest.approx(0.25)


def test_mahalanobis_scores_points_far_from_every_class_higher_than_points_near_one():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0, 0, 0], [5, 5, 0, 0]])
    labels = rng.integers(0, 2, 400)
    x = means[labels] + rng.normal(0, 1, (400, 4)) * np.array([1, 1, 0.2, 0.2])  # thin in two directions
    scorer = fit_mahalanobis(x, labels)
    near = means[[0, 1]] + np.array([[1.0, 0, 0, 0], [0, -1.0, 0, 0]])
    off_plane = means[[0, 1]] + np.array([[0, 0, 1.0, 0], [0, 0, 0, 1.0]])  # as far in euclidean terms, but unseen
    assert np.all(scorer.score(off_plane) > 5 * scorer.score(near).max())


def test_evaluate_ood_folder_separates_noise_from_the_training_shapes(tmp_path, sample_dir, cli):
    from PIL import Image

    from factories import make_run_dir, small_config

    config = small_config(tmp_path, sample_dir, backbone="vgg16")
    run_dir = make_run_dir(config)
    ood = tmp_path / "ood"
    ood.mkdir()
    rng = np.random.default_rng(3)
    for k in range(10):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(ood / f"noise_{k}.png")
    (ood / "broken.jpg").write_bytes(b"not an image")
    result = cli("evaluate", run_dir, "--split", "all", "--top-losses", 1, "--out", tmp_path / "eval",
                 "--ood-folder", ood, "--json")
    assert result.exit_code == 0, result.output
    import json

    figures = json.loads(result.output[result.output.index("{"):])["ood"]
    assert figures["mahalanobis"]["ood_images"] == 10 and [s["path"] for s in figures["skipped"]] == [
        str(ood / "broken.jpg")]
    # noise is far from every shape class in feature space, even with random weights (0.89 measured)
    assert figures["mahalanobis"]["auroc"] >= 0.8, figures
    assert figures["mahalanobis"]["in_accepted"] >= 0.95
    assert figures["better"] in ("model", "mahalanobis", "max_softmax")

    missing = cli("evaluate", run_dir, "--ood-folder", tmp_path / "nowhere")
    assert missing.exit_code != 0 and "not a folder" in missing.output and "Traceback" not in missing.output
