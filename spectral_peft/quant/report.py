"""The data of the 4-bit figures: both codebooks and the quantisation error of a model's linears.

Plain data (lists, floats) for results.json; spectral_peft.plots.quant draws it.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_host
from ..module import Linear
from .blockwise import dequantize_4bit, quantize_4bit
from .codebooks import QUANT_TYPES, get_4bit_code


def quantization_record(model, blocksize: int) -> dict:
    """{"codebooks": {quant_type: 16 code values}, "layer_error": {layer: {quant_type: {rmse,
    max_abs, rel_fro}}}, "normalized_histogram": {counts, edges}} for the dense Linears of a
    float32 CPU ``model`` (its first linear's weights, divided by their block absmax, against the
    codebooks)."""
    rec: dict = {"codebooks": {qt: [float(v) for v in np.asarray(get_4bit_code(qt)).reshape(-1)] for qt in QUANT_TYPES}}
    linears = [(p, m) for p, m in model.named_modules() if type(m) is Linear]
    errors = {}
    for path, m in linears:
        W = np.asarray(to_host(m.params["weight"]), dtype=np.float32)
        row = {}
        for qt in QUANT_TYPES:
            packed, state = quantize_4bit(W, quant_type=qt, blocksize=blocksize, compress_statistics=False)
            err = np.asarray(to_host(dequantize_4bit(packed, state)), dtype=np.float32).reshape(W.shape) - W
            row[qt] = {"rmse": float(np.sqrt(np.mean(err ** 2))), "max_abs": float(np.abs(err).max()),
                       "rel_fro": float(np.linalg.norm(err) / np.linalg.norm(W))}
        errors[path.replace("transformer.", "")] = row
    rec["layer_error"] = errors
    if linears:
        W = np.asarray(to_host(linears[0][1].params["weight"]), dtype=np.float32).reshape(-1)
        n = W.size // blocksize * blocksize
        blocks = W[:n].reshape(-1, blocksize)
        normed = blocks / np.abs(blocks).max(axis=1, keepdims=True)
        hist, edges = np.histogram(normed, bins=64, range=(-1, 1))
        rec["normalized_histogram"] = {"counts": [int(v) for v in hist], "edges": [float(v) for v in edges]}
    return rec
