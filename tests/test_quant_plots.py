"""The quantisation figures: written, and drawing the numbers they claim."""
import os

import numpy as np

from spectral_peft.plots.quant import plot_codebooks, plot_quantization_error
from spectral_peft.quant import get_4bit_code
from spectral_peft.quant.codebooks import max_gap


def test_plot_codebooks(tmp_path):
    path = tmp_path / "codebooks.png"
    drawn = plot_codebooks(str(path))
    assert path.exists() and os.path.getsize(path) > 1000
    assert np.array_equal(drawn["nf4"], np.sort(get_4bit_code("nf4")))
    # NF4 is built from normal quantiles: it is closer to them than FP4 is
    q = np.array(drawn["normal_quantiles"])
    assert np.abs(np.array(drawn["nf4"]) - q).max() < np.abs(np.array(drawn["fp4"]) - q).max()


def test_plot_quantization_error(tmp_path):
    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    path = tmp_path / "error.svg"
    rms = plot_quantization_error(str(path), weight=w, name="test matrix", blocksize=64)
    assert path.exists() and os.path.getsize(path) > 1000
    assert set(rms) == {"NF4", "NF4 + double quant", "FP4"}
    # every error is below half the largest code gap (relative to the block absmax), so is the rms
    assert 0 < rms["NF4"] < max_gap(get_4bit_code("nf4")) / 2
    assert rms["NF4"] < rms["FP4"]  # normal weights: NF4 is the better 4-bit type
