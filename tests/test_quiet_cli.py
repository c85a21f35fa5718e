"""The command line shows only tl-app's own output unless --verbose asks for TensorFlow's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TENSORFLOW_NOISE = ("cuda", "oneDNN", "absl", "cpu_feature_guard", "I0000", "W0000", "E0000")


def run(*args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TL_APP_VERBOSE")}
    return subprocess.run([sys.executable, "-m", "tl_app", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**environ, **env})


def test_a_command_that_loads_tensorflow_prints_nothing_of_it_on_stderr():
    result = run("backbones", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.lstrip().startswith("[")
    assert result.stderr == "", result.stderr


def test_verbose_lets_tensorflow_log_lines_through():
    flag = run("--verbose", "backbones", "--json")
    env = run("backbones", "--json", TL_APP_VERBOSE="1")
    for result in (flag, env):
        assert result.returncode == 0, result.stderr
        # TensorFlow always reports its CPU or GPU set-up at start; quiet mode hides exactly that
        assert any(word in result.stderr for word in TENSORFLOW_NOISE), result.stderr
