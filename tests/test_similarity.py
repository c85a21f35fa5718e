"""Image retrieval (index, similar) and feature maps (embed) on real features."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_app.insight.similarity import SimilarityIndex, naive_top_k, top_k


# ---- the index itself, on random vectors -----------------------------------------
def test_top_k_matches_the_naive_loop_and_sorts_by_similarity():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 64)).astype(np.float32)
    index = SimilarityIndex.from_features(vectors, [{"id": i} for i in range(500)], {})
    for query in rng.standard_normal((5, 64)).astype(np.float32):
        indices, sims = top_k(index.vectors, query, 7)
        expected = naive_top_k(vectors, query, 7)
        assert indices[0].tolist() == [i for i, _ in expected]
        assert sims[0] == pytest.approx([s for _, s in expected], abs=1e-5)
        assert np.all(np.diff(sims[0]) <= 0)


def test_a_vector_in_the_index_finds_itself_first_with_similarity_one():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((100, 32)).astype(np.float32)
    index = SimilarityIndex.from_features(vectors, [{"id": i} for i in range(100)], {})
    hits = index.search(vectors[[3, 42]] * 5.0, k=3)  # scale does not matter for cosine
    assert [h[0]["id"] for h in hits] == [3, 42]
    assert hits[0][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0][0]["distance"] == pytest.approx(0.0, abs=1e-5)
    assert [h["rank"] for h in hits[0]] == [1, 2, 3]


def test_k_larger_than_the_index_returns_everything():
    vectors = np.eye(4, dtype=np.float32)
    index = SimilarityIndex.from_features(vectors, [{"id": i} for i in range(4)], {})
    hits = index.search(vectors[:1], k=10)[0]
    assert [h["id"] for h in hits] == [0, 1, 2, 3]  # ties broken by position


def test_float16_storage_saves_half_and_gives_the_same_neighbours(tmp_path):
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((300, 128)).astype(np.float32)
    items = [{"id": i} for i in range(300)]
    full = SimilarityIndex.from_features(vectors, items, {"backbone": "resnet50"})
    half = SimilarityIndex.from_features(vectors, items, {"backbone": "resnet50"}, dtype="float16")
    full.save(tmp_path / "f32")
    half.save(tmp_path / "f16")
    assert (tmp_path / "f16" / "vectors.npy").stat().st_size < 0.6 * (tmp_path / "f32" / "vectors.npy").stat().st_size
    queries = rng.standard_normal((4, 128)).astype(np.float32)
    expected = [[h["id"] for h in row] for row in full.search(queries, 5)]
    for loaded in (SimilarityIndex.load(tmp_path / "f16"), SimilarityIndex.load(tmp_path / "f16", upcast=False)):
        assert [[h["id"] for h in row] for row in loaded.search(queries, 5)] == expected
    assert SimilarityIndex.load(tmp_path / "f16", upcast=False).vectors.dtype == np.float16
    assert SimilarityIndex.load(tmp_path / "f32").recipe["backbone"] == "resnet50"


def test_loading_something_that_is_not_an_index_is_a_clear_error(tmp_path):
    from tl_app.core.errors import TlAppError

    with pytest.raises(TlAppError, match="tl-app index"):
        SimilarityIndex.load(tmp_path)


# ---- real features: near-duplicates ------------------------------------------------
@pytest.fixture(scope="module")
def duplicate_data(tmp_path_factory, sample_dir):
    """9 sample images plus a resized and a re-encoded copy of one of them."""
    root = tmp_path_factory.mktemp("dups") / "data"
    for label in ("circles", "squares", "triangles"):
        (root / label).mkdir(parents=True)
        for path in sorted((sample_dir / label).iterdir())[:3]:
            shutil.copy(path, root / label / path.name)
    original = sorted((root / "circles").iterdir())[0]
    with Image.open(original) as image:
        rgb = image.convert("RGB")
        rgb.resize((rgb.width * 2 // 3, rgb.height * 2 // 3), Image.Resampling.BICUBIC).save(
            root / "circles" / "copy_resized.png")
        rgb.save(root / "circles" / "copy_reencoded.jpg", "JPEG", quality=55)
    outside = root.parent / "queries"
    outside.mkdir()
    other = sorted((root / "squares").iterdir())[1]
    with Image.open(other) as image:
        image.convert("RGB").resize((image.width // 2, image.height // 2)).save(outside / "small_copy.jpg",
                                                                                 quality=70)
    return {"root": root, "original": original, "other": other, "outside_copy": outside / "small_copy.jpg"}


@pytest.fixture(scope="module")
def index_config(duplicate_data):
    """resnet50, random weights, 64x64; one feature cache for the whole module."""
    from tl_app.core.config import Config

    config = Config()
    config.data.root = str(duplicate_data["root"])
    config.backbone.weights = "none"
    config.backbone.input_size = 64
    config.features.cache_dir = str(duplicate_data["root"].parent / "cache" / "features")
    config.data.batch_size = 8
    return config


@pytest.fixture(scope="module")
def built_index(index_config, duplicate_data):
    from tl_app.insight.similarity import build_index

    out = duplicate_data["root"].parent / "index"
    return build_index(index_config, out, echo=None)


def test_query_finds_itself_first_then_its_near_duplicates(built_index, duplicate_data, tmp_path):
    from tl_app.insight.similarity import similar

    assert built_index["count"] == 11 and built_index["features"]["computed"] == 11
    result = similar(built_index["index"], [duplicate_data["original"], duplicate_data["outside_copy"]], k=4,
                     sheet=tmp_path / "sheet.png", echo=None, include_self=True)  # the default leaves it out
    first, second = result["queries"]
    names = [Path(h["path"]).name for h in first["neighbours"]]
    assert names[0] == duplicate_data["original"].name
    assert first["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert set(names[1:3]) == {"copy_resized.png", "copy_reencoded.jpg"}
    # a re-encoded half-size copy that is not in the index finds its original first
    assert Path(second["neighbours"][0]["path"]).name == duplicate_data["other"].name
    with Image.open(result["sheet"]) as sheet:
        assert sheet.format == "PNG" and sheet.width > 400


def test_building_the_index_again_reuses_cached_features(built_index, index_config, tmp_path):
    from tl_app.insight.similarity import build_index

    again = build_index(index_config, tmp_path / "b", echo=None)
    assert again["features"]["computed"] == 0 and again["features"]["cached"] == 11


def test_cli_index_and_similar_with_json_and_contact_sheet(built_index, index_config, duplicate_data, cli, tmp_path):
    common = ["--backbone", "resnet50", "--weights", "none", "--input-size", "64",
              "--cache-dir", index_config.features.cache_dir]
    result = cli("index", duplicate_data["root"], "--out", tmp_path / "idx", "--json", *common)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["features"]["cached"] == 11  # the library run's cache is reused
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    result = cli("similar", tmp_path / "idx", duplicate_data["original"], bad, "-k", "3", "--out",
                 tmp_path / "sheet.png", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    hits = doc["queries"][0]["neighbours"]
    assert len(hits) == 3 and {"path", "label", "similarity", "distance", "rank"} <= set(hits[0])
    assert doc["skipped"][0]["path"] == str(bad)
    assert Path(doc["sheet"]).is_file()


# ---- embed ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embed_draws_a_scatter_coloured_by_class(built_index, index_config, duplicate_data, tmp_path, method):
    from tl_app.insight.embed import embed

    out = tmp_path / f"{method}.png"
    summary = embed(duplicate_data["root"], method, out, config=index_config, echo=None)
    assert summary["count"] == 11 and summary["classes"] == ["circles", "squares", "triangles"]
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert image.width > 500
    # the three tab10 class colours (drawn with alpha 0.8 on white) appear in the plot
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        shown = 0.8 * np.array(colour) + 0.2 * 255
        assert (np.abs(pixels.astype(int) - shown).sum(axis=-1) < 12).sum() > 20
    rows = Path(summary["coordinates"]).read_text().splitlines()
    assert rows[0] == "x,y,label" and len(rows) == 12


def test_embed_reads_a_similarity_index_without_recomputing(built_index, tmp_path, cli, monkeypatch):
    import tl_app.features.extract as extract
    import tl_app.insight.feature_map as embed_module  # the CLI's embed (tl_app.insight.embed wraps it)

    def no_backbone(*args, **kwargs):
        raise AssertionError("embed of an index must read its vectors, not extract features again")

    monkeypatch.setattr(extract.Extractor, "build", no_backbone)
    monkeypatch.setattr(embed_module, "extract_features", no_backbone)
    result = cli("embed", built_index["index"], "--method", "pca", "--out", tmp_path / "p.png", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["source"].startswith("similarity index") and len(doc["explained_variance_ratio"]) == 2


def test_embed_reads_an_extracted_feature_folder(built_index, index_config, tmp_path):
    from tl_app.insight.embed import embed
    from tl_app.features.extract import extract_features

    extract_features(index_config, out_dir=tmp_path / "feats", echo=None)
    summary = embed(tmp_path / "feats", "pca", tmp_path / "p.png", echo=None)
    assert summary["source"].startswith("feature folder") and summary["count"] == 11
    assert summary["dim"] == 2048
