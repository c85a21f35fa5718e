"""The k-NN unknown scorer: numpy and the Keras layer agree, and it survives .keras and SavedModel round trips."""

from __future__ import annotations

import numpy as np
import pytest

from tl_app.models.knn_score import KnnScore, fit_knn, knn_layer, normalised


def clusters(seed=0, n=40, dim=16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (3, dim)) * 4
    labels = rng.integers(0, 3, n)
    return centres[labels] + rng.normal(0, 0.5, (n, dim)), labels, centres


def test_knn_scores_points_near_training_features_low_and_other_directions_high():
    x, labels, centres = clusters()
    scorer = fit_knn(x, labels, k=3)
    near = centres + np.random.default_rng(1).normal(0, 0.5, centres.shape)
    far = np.random.default_rng(2).normal(0, 1, (20, x.shape[1])) * 4  # random directions
    assert scorer.score(near).max() < scorer.score(far).min()
    # the k-th neighbour, by hand: a training point itself has similarity 1 with itself (the first neighbour)
    sim = normalised(x[:1]) @ normalised(x).T
    assert scorer.score(x[:1])[0] == pytest.approx(1 - np.sort(sim[0])[-3])


def test_bank_is_capped_evenly_across_classes():
    x, labels, _ = clusters(n=300)
    scorer = fit_knn(x, labels, max_bank=30)
    assert scorer.bank.shape == (30, x.shape[1])
    assert np.allclose(np.linalg.norm(scorer.bank, axis=1), 1.0)


def test_layer_matches_numpy_and_round_trips_through_keras_and_savedmodel(tmp_path):
    import keras
    import tensorflow as tf

    x, labels, _ = clusters()
    scorer = fit_knn(x, labels)
    inputs = keras.Input((x.shape[1],))
    model = keras.Model(inputs, knn_layer(scorer, threshold=0.25, name="ood_score")(inputs))
    probe = np.random.default_rng(3).normal(0, 3, (7, x.shape[1])).astype(np.float32)
    expected = scorer.score(probe)
    assert np.asarray(model(probe)) == pytest.approx(expected, abs=1e-5)

    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    layer = loaded.get_layer("ood_score")
    assert isinstance(layer, KnnScore) and layer.threshold == 0.25 and layer.k == scorer.k
    assert np.asarray(loaded(probe)) == pytest.approx(expected, abs=1e-5)

    model.export(tmp_path / "sm", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "sm"))
    assert np.asarray(served.serve(tf.constant(probe))) == pytest.approx(expected, abs=1e-5)
