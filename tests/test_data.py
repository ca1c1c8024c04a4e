"""The embedded default data: byte tokenizer, docstring stripping/extraction, deterministic corpora,
batches."""
import ast
import hashlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft import data

SOURCE = '''"""Module docstring, long enough to be kept by the extractor."""
import os


def f(x):
    """Return x plus one; a docstring of more than forty characters."""
    # a comment that stays
    return x + 1


class K:
    """Short."""

    def g(self):
        return "not a docstring, just a string expression in code"
'''


@given(st.text(max_size=200))
def test_byte_tokenizer_round_trip(text):
    tok = data.ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64
    assert ids.size == len(text.encode("utf-8"))
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < 256)
    assert tok.decode(ids) == text


def test_strip_docstrings_keeps_code_and_comments():
    out = data.strip_docstrings(SOURCE)
    tree = ast.parse(out)  # still valid Python
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
            assert ast.get_docstring(node) is None
    assert "Module docstring" not in out and "Return x plus one" not in out and "Short." not in out
    assert "# a comment that stays" in out and "return x + 1" in out
    assert "not a docstring, just a string expression in code" in out


def test_docstrings_of_source_in_order_and_filtered():
    docs = data.docstrings_of_source(SOURCE)
    assert docs == ["Module docstring, long enough to be kept by the extractor.",
                    "Return x plus one; a docstring of more than forty characters."]  # "Short." is dropped


def test_module_lists_are_disjoint():
    assert not set(data.PRETRAIN_MODULES) & set(data.FINETUNE_MODULES)


def test_corpora_are_deterministic_and_split():
    a = data.pretrain_corpus(max_bytes=50_000)
    b = data.pretrain_corpus(max_bytes=50_000)
    assert a.summary() == b.summary()
    assert a.summary()["bytes"] == 50_000
    assert a.summary()["sha256"] == hashlib.sha256(a.text.encode()).hexdigest()
    assert np.array_equal(a.tokens, data.ByteTokenizer().encode(a.text))
    assert "def " in a.text and "import " in a.text  # code
    train, ev = data.finetune_corpora()
    assert train.summary()["sha256"] != ev.summary()["sha256"]
    # the held-out docstrings never appear in the training text
    for doc in ev.text.split("\n\n")[:20]:
        if len(doc) > 200:
            assert doc not in train.text
    assert 0.05 < len(ev.text) / (len(ev.text) + len(train.text)) < 0.25  # every 8th docstring


def test_sample_batch_windows_come_from_the_stream():
    tokens = np.arange(1000, dtype=np.int64)
    rng = np.random.default_rng(3)
    batch = data.sample_batch(tokens, 5, 17, rng)
    assert batch.shape == (5, 17) and batch.dtype == np.int64
    for row in batch:  # consecutive tokens of the stream
        assert np.array_equal(row, np.arange(row[0], row[0] + 17))
    again = data.sample_batch(tokens, 5, 17, np.random.default_rng(3))
    assert np.array_equal(batch, again)
    with pytest.raises(ValueError, match="seq_len"):
        data.sample_batch(tokens[:10], 2, 10, rng)


def test_eval_batches_are_consecutive_and_bounded():
    tokens = np.arange(100, dtype=np.int64)
    batches = data.eval_batches(tokens, batch_size=3, seq_len=10, max_batches=2)
    assert [b.shape for b in batches] == [(3, 10), (3, 10)]
    assert np.array_equal(np.concatenate(batches).reshape(-1), np.arange(60))
    short = data.eval_batches(tokens, batch_size=4, seq_len=30, max_batches=5)
    assert [b.shape for b in short] == [(3, 30)]
