"""BERT: parity with transformers' BertForSequenceClassification and BertModel (logits, loss,
every gradient, padding, token types), central differences, invariants and bad inputs."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.backend import get_backend, to_host
from spectral_peft.model import (BertConfig, BertForSequenceClassification, BertModel, hf_gradients,
                                 load_pretrained, save_pretrained)
from spectral_peft.testing import assert_close, numerical_gradient

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer these comparisons run against")
transformers.logging.set_verbosity_error()

V = 31


def tiny_config(**kw):
    base = dict(vocab_size=V, hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=20,
                max_position_embeddings=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    base.update(kw)
    return BertConfig(**base)


def batch(seed, B=3, T=8, lengths=(8, 5, 2)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, (B, T))
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids[mask == 0] = 0  # [PAD] = 0, whose word-embedding row gets no gradient
    tt = rng.integers(0, 2, (B, T))
    return ids, mask, tt


def compare_grads(grads: dict, t_params: dict, rtol: float):
    """As in test_model_gpt2: scale-relative, with a model-scale floor for exactly-zero gradients
    (attention key biases)."""
    scale = max(float(np.abs(p.grad.numpy()).max()) for p in t_params.values() if p.grad is not None)
    for name, p in t_params.items():
        e = np.zeros(tuple(p.shape)) if p.grad is None else p.grad.numpy()
        floor = rtol * 1e-3 * scale if float(np.abs(e).max()) < 1e-9 * scale else None
        assert_close(grads[name], e, name, rtol, atol=floor)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    save_pretrained(BertForSequenceClassification(tiny_config(), get_backend("cpu", "float64"), seed=4), d)
    return d


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_classifier_parity_with_transformers(ckpt, dtype):
    tdtype, rtol = (torch.float64, 1e-10) if dtype == "float64" else (torch.float32, 1e-4)
    model = load_pretrained(ckpt, get_backend("cpu", dtype))
    assert isinstance(model, BertForSequenceClassification)
    tm = transformers.BertForSequenceClassification.from_pretrained(str(ckpt), attn_implementation="eager",
                                                                     dtype=tdtype).eval()
    ids, mask, tt = batch(0)
    labels = np.array([2, 0, 1])
    out = model.forward(ids, mask, labels, tt)
    model.zero_grad()
    model.backward()
    t = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(tt),
           labels=torch.tensor(labels))
    t.loss.backward()
    assert_close(out.logits, t.logits.detach().numpy(), "logits", rtol)
    assert_close(np.array(out.loss), np.array(t.loss.item()), "loss", rtol)
    grads = hf_gradients(model)
    t_params = dict(tm.named_parameters())
    assert set(grads) == set(t_params)
    compare_grads(grads, t_params, rtol)


def test_regression_parity(tmp_path):
    model = BertForSequenceClassification(tiny_config(num_labels=1), get_backend("cpu", "float64"), seed=1)
    save_pretrained(model, tmp_path)
    tm = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                                     dtype=torch.float64).eval()
    assert tm.config.num_labels == 1
    ids, mask, tt = batch(1)
    y = np.array([0.5, -1.0, 2.0])
    out = model.forward(ids, mask, y, tt)
    model.zero_grad()
    model.backward()
    t = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(tt),
           labels=torch.tensor(y))
    t.loss.backward()
    assert_close(np.array(out.loss), np.array(t.loss.item()), "mse loss", 1e-10)
    compare_grads(hf_gradients(model), dict(tm.named_parameters()), 1e-10)


def test_bare_model_parity(tmp_path):
    model = BertModel(tiny_config(), get_backend("cpu", "float64"), seed=2)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, get_backend("cpu", "float64"))
    assert type(loaded) is BertModel
    tm = transformers.BertModel.from_pretrained(str(tmp_path), attn_implementation="eager", dtype=torch.float64).eval()
    ids, mask, tt = batch(2)
    G = np.random.default_rng(0).standard_normal((3, 8, 12))
    Gp = np.random.default_rng(1).standard_normal((3, 12))
    out = loaded.forward(ids, mask, token_type_ids=tt)
    loaded.zero_grad()
    loaded.backward(G, d_pooled=Gp)
    t = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(tt))
    ((t.last_hidden_state * torch.tensor(G)).sum() + (t.pooler_output * torch.tensor(Gp)).sum()).backward()
    assert_close(out.last_hidden_state, t.last_hidden_state.detach().numpy(), "last_hidden_state", 1e-10)
    assert_close(out.pooler_output, t.pooler_output.detach().numpy(), "pooler_output", 1e-10)
    compare_grads(hf_gradients(loaded), dict(tm.named_parameters()), 1e-10)


@settings(max_examples=4)
@given(B=st.integers(1, 3), T=st.integers(1, 5), H=st.sampled_from([1, 2]), hd=st.integers(2, 3),
       L=st.integers(1, 2), K=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_whole_model_central_differences(B, T, H, hd, L, K, seed):
    cfg = tiny_config(hidden_size=H * hd, num_attention_heads=H, num_hidden_layers=L, intermediate_size=5,
                      max_position_embeddings=T, num_labels=K, pad_token_id=None)
    model = BertForSequenceClassification(cfg, get_backend("cpu", "float64"), seed=seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    tt = rng.integers(0, 2, (B, T))
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    labels = rng.standard_normal(B) if K == 1 else rng.integers(0, K, B)
    model.forward(ids, mask, labels, tt)
    model.zero_grad()
    model.backward()
    for name, m, k in model.named_parameters(trainable_only=True):
        flat = m.params[k].reshape(-1)
        idx = rng.choice(flat.size, size=min(3, flat.size), replace=False)
        view = flat[idx].copy()
        analytic = to_host(m.grads[k]).reshape(-1)[idx]

        def f():
            flat[idx] = view
            return model.forward(ids, mask, labels, tt).loss

        num = numerical_gradient(f, view)
        flat[idx] = view
        # atol: a whole model's loss differenced at step h carries ~1e-16·|loss|/h ≈ 1e-9 of rounding
        # noise (seen at 1.06e-9 on a drawn config); the exact check is the PyTorch parity test
        assert_close(analytic, num, f"d{name}", 1e-6, atol=5e-9)


def test_padding_never_changes_real_outputs(backend64):
    model = BertModel(tiny_config(), backend64, seed=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, V, (1, 4))
    alone = to_host(model.forward(ids).last_hidden_state)
    padded = np.concatenate([ids, np.zeros((1, 3), np.int64)], axis=1)
    mask = np.array([[1, 1, 1, 1, 0, 0, 0]])
    out = to_host(model.forward(padded, mask).last_hidden_state)
    assert_close(out[:, :4], alone, "real positions", 1e-12)


def test_same_seed_bitwise_identical_and_inputs_untouched():
    be = get_backend("cpu", "float32")
    cfg = tiny_config(hidden_dropout_prob=0.25)
    ids, mask, tt = batch(3)
    labels = np.array([0, 1, 2])
    copies = [a.copy() for a in (ids, mask, tt, labels)]
    losses = []
    for _ in range(2):
        m = BertForSequenceClassification(cfg, be, seed=9)
        losses.append(m.forward(ids, mask, labels, tt).loss)
        m.backward()
    assert losses[0] == losses[1]
    for a, c in zip((ids, mask, tt, labels), copies):
        assert np.array_equal(a, c)


def test_pad_row_gets_no_gradient():
    model = BertForSequenceClassification(tiny_config(), get_backend("cpu", "float64"))
    ids, mask, tt = batch(4)
    model.forward(ids, mask, np.array([0, 1, 2]), tt)
    model.backward()
    g = model.bert.embeddings.word_embeddings.grads["weight"]
    assert np.all(g[0] == 0) and np.abs(g[1:]).max() > 0


@pytest.mark.parametrize("bad, match", [
    (dict(input_ids=np.zeros((2, 11), np.int64)), "max_position_embeddings"),
    (dict(input_ids=np.full((2, 3), -1, np.int64)), "outside"),
    (dict(token_type_ids=np.full((2, 3), 2, np.int64)), "token_type_ids"),
    (dict(token_type_ids=np.zeros((2, 4), np.int64)), "token_type_ids"),
    (dict(labels=np.array([0, 3])), "labels"),
    (dict(labels=np.array([0.0, 1.0])), "labels"),
    (dict(labels=np.zeros((2, 3), np.int64)), "labels"),
    (dict(attention_mask=np.ones((3, 3))), "attention_mask"),
])
def test_bad_inputs(bad, match):
    model = BertForSequenceClassification(tiny_config(), get_backend("cpu", "float64"))
    kw = dict(input_ids=np.ones((2, 3), np.int64))
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        model.forward(**kw)
    assert model.activation_bytes() == 0


@pytest.mark.parametrize("kw, match", [
    (dict(hidden_size=10), "divisible"),
    (dict(hidden_act="gelu_unknown"), "known"),
    (dict(num_labels=0), r"num_labels must be an integer >= 1"),
    (dict(pad_token_id=V), "pad_token_id"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_config_from_hf_dict():
    d = transformers.BertConfig(hidden_size=16, num_attention_heads=4, num_labels=5).to_dict()
    cfg = BertConfig.from_dict(d)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_labels) == (16, 4, 5)
    with pytest.raises(ValueError, match="model_type"):
        BertConfig.from_dict({"model_type": "gpt2"})
