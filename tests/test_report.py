"""tl-app report: one self-contained HTML file, rendered by headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


from tl_app.insight.report import SECTIONS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def write_history(run_dir: Path) -> None:
    epochs = [{"epoch": i + 1, "phase": 1 if i < 3 else 2, "loss": 1.0 / (i + 1), "accuracy": 0.5 + 0.1 * i,
               "val_loss": 1.1 / (i + 1) + 0.05 * i, "val_accuracy": 0.45 + 0.05 * i} for i in range(5)]
    (run_dir / "history.json").write_text(json.dumps({"epochs": epochs}))


@pytest.fixture(scope="module")
def report_path(tmp_path_factory, sample_dir):
    from factories import make_run_dir, small_config

    from tl_app.insight.report import build_report

    config = small_config(tmp_path_factory.mktemp("report"), sample_dir)
    run_dir = make_run_dir(config, metrics={"val_accuracy": 0.5, "val_loss": 1.0})
    write_history(run_dir)
    return build_report(run_dir, explanations=2, echo=None)


def chromium(*args: str, user_data: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={user_data}", *args],
        capture_output=True, text=True, timeout=timeout)


def test_report_has_every_section_and_is_self_contained(report_path):
    text = report_path.read_text()
    for section_id in SECTIONS:
        assert f'id="{section_id}"' in text
    images = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(images) >= 5  # curves, 2 confusion matrices, top losses, explanations
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:|file:|//)', text)  # nothing fetched from elsewhere
    assert re.search(r'<p class="diag (over-fitting|under-fitting|healthy)">', text)  # the diagnosis is shown
    run_dir = report_path.parent
    assert (run_dir / "curves.png").is_file() and (run_dir / "evaluation" / "metrics.json").is_file()


def test_report_renders_in_headless_chromium(report_path, tmp_path):
    assert CHROMIUM, "headless Chromium is missing: make test installs it (make browser)"
    dom = chromium("--dump-dom", report_path.as_uri(), user_data=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section_id in SECTIONS:
        assert f'id="{section_id}"' in dom.stdout
    assert dom.stdout.count("<img") >= 5 and "<table" in dom.stdout

    shot = tmp_path / "report.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1200,2000", report_path.as_uri(),
                      user_data=tmp_path / "profile-shot")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    header = pixels[:60].reshape(-1, 3).mean(axis=0)
    assert header.max() < 90  # the dark header bar was painted
    assert pixels.std() > 20  # and so was much else: text, tables, images
    assert len(np.unique(pixels.reshape(-1, 3)[::97], axis=0)) > 100  # figures, not a blank page


def test_cli_report_without_history_or_evaluation(tiny_config, cli):
    from factories import make_run_dir

    run_dir = make_run_dir(tiny_config)
    result = cli("report", run_dir, "--no-evaluate")
    assert result.exit_code == 0, result.output
    text = (run_dir / "report.html").read_text()
    assert "no training history" in text and "no evaluation yet" in text
    result = cli("report", run_dir.parent / "missing")
    assert result.exit_code != 0 and "run directory" in result.output
