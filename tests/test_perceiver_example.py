"""Smoke test of docs/examples/perceiver_digits.py: after 150 steps of training the
loss went down and both figures are written. (The full run is by hand; see the script.)"""

import importlib.util
import pathlib

import numpy as np

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "examples" / "perceiver_digits.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("perceiver_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_perceiver_digits_smoke(tmp_path, capsys):
    example = _load_example()
    # The example's model without augmentation, for a short while; smaller configurations sit
    # on the uniform-prediction plateau (loss ln 10) for hundreds of steps.
    short = ["--max-shift", "0", "--label-smoothing", "0", "--batch-size", "32",
             "--steps", "150", "--eval-every", "150"]  # fmt: skip
    histories = example.main([*short, "--seeds", "0", "--out", str(tmp_path), "--no-progress"])
    loss = histories[0]["loss"]
    assert loss.shape == (150,)
    assert np.all(np.isfinite(loss))
    assert loss[-20:].mean() < 0.9 * loss[:20].mean()
    assert 0.0 <= histories[0]["test_accuracy"][-1] <= 1.0
    assert "test accuracy: mean" in capsys.readouterr().out
    for name in ("digits_training.png", "digits_attention.png"):
        assert (tmp_path / name).stat().st_size > 1000
