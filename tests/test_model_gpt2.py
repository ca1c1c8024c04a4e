"""GPT-2: parity with transformers (logits, loss, every gradient, padding), central differences of
the whole model, invariants (causality, padding, determinism, inputs untouched), bad inputs, and
memory accounting."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.backend import get_backend, to_host
from spectral_peft.memory import memory_report
from spectral_peft.model import GPT2Config, GPT2LMHeadModel, hf_gradients, save_pretrained
from spectral_peft.testing import assert_close, numerical_gradient

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer these comparisons run against")
transformers.logging.set_verbosity_error()

V = 29


def tiny_config(**kw):
    base = dict(vocab_size=V, n_positions=12, n_embd=12, n_layer=2, n_head=3, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0)
    base.update(kw)
    return GPT2Config(**base)


def batch(seed, B=3, T=8, lengths=(8, 6, 3)):
    """Right-padded ids, mask and labels (-100 on padding)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    labels = np.where(mask == 1, ids, -100)
    return ids, mask, labels


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """An engine model (float64) and the transformers model loaded from its saved checkpoint."""
    d = tmp_path_factory.mktemp("gpt2")
    model = GPT2LMHeadModel(tiny_config(), get_backend("cpu", "float64"), seed=3)
    save_pretrained(model, d)
    return d, model


def torch_model(d, dtype):
    tm = transformers.GPT2LMHeadModel.from_pretrained(str(d), attn_implementation="eager", dtype=dtype)
    return tm.eval()


def torch_loss(logits, labels):
    """HF's causal-LM loss written out in torch: position t predicts labels[:, t+1]."""
    Vv = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, Vv), torch.tensor(labels)[:, 1:].reshape(-1),
                                             ignore_index=-100)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parity_with_transformers(hf_pair, dtype, tmp_path):
    d, model64 = hf_pair
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    rtol = 1e-10 if dtype == "float64" else 1e-4
    from spectral_peft.model import load_pretrained

    model = load_pretrained(d, get_backend("cpu", dtype))
    tm = torch_model(d, tdtype)
    ids, mask, labels = batch(0)
    out = model.forward(ids, mask, labels)
    model.zero_grad()
    model.backward()
    t_out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    t_loss = torch_loss(t_out.logits, labels)
    t_loss.backward()
    real = mask.astype(bool)  # padded query positions' logits are not compared (HF's are meaningful too,
    # but only real positions carry meaning); every real position is.
    assert_close(out.logits[real], t_out.logits.detach().numpy()[real], "logits", rtol)
    assert_close(np.array(out.loss), np.array(t_loss.item()), "loss", rtol)
    grads = hf_gradients(model)
    t_params = dict(tm.named_parameters())
    assert set(grads) == set(t_params), "one gradient per transformers parameter"
    compare_grads(grads, t_params, rtol)
    if dtype == "float32":
        # transformers' own labels path (it computes the loss in float32)
        t_out2 = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
        assert_close(np.array(out.loss), np.array(t_out2.loss.item()), "HF loss", rtol)


def test_parity_dlogits_without_labels(hf_pair):
    d, model = hf_pair
    tm = torch_model(d, torch.float64)
    ids, mask, _ = batch(1)
    G = np.random.default_rng(5).standard_normal((3, 8, V))
    out = model.forward(ids, mask)
    assert out.loss is None
    model.zero_grad()
    model.backward(G)
    t_out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    (t_out.logits * torch.tensor(G)).sum().backward()
    compare_grads(hf_gradients(model), dict(tm.named_parameters()), 1e-10)


def test_parity_with_per_row_position_ids(hf_pair):
    """position_ids (B, T) (left-padded generation's cumsum(mask) - 1): logits, loss and every
    gradient, wpe's scatter over the given positions included, against transformers in float64."""
    d, model = hf_pair
    tm = torch_model(d, torch.float64)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, V, (3, 8))
    pos = rng.integers(0, 12, (3, 8))  # repeated and out-of-order positions: the scatter must add them
    labels = rng.integers(0, V, (3, 8))
    out = model.forward(ids, labels=labels, position_ids=pos)
    model.zero_grad()
    model.backward()
    t_out = tm(input_ids=torch.tensor(ids), position_ids=torch.tensor(pos))
    t_loss = torch_loss(t_out.logits, labels)
    t_loss.backward()
    assert_close(out.logits, t_out.logits.detach().numpy(), "logits", 1e-10)
    assert_close(np.array(out.loss), np.array(t_loss.item()), "loss", 1e-10)
    compare_grads(hf_gradients(model), dict(tm.named_parameters()), 1e-10)


def test_position_ids_central_differences():
    model = GPT2LMHeadModel(tiny_config(n_layer=1), get_backend("cpu", "float64"), seed=2)
    rng = np.random.default_rng(9)
    ids, labels = rng.integers(0, V, (2, 5)), rng.integers(0, V, (2, 5))
    pos = np.array([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    model.forward(ids, labels=labels, position_ids=pos)
    model.zero_grad()
    model.backward()
    wpe = model.transformer.wpe.params["weight"]
    num = numerical_gradient(lambda: model.forward(ids, labels=labels, position_ids=pos).loss, wpe)
    assert_close(to_host(model.transformer.wpe.grads["weight"]), num, "dwpe with position_ids", 1e-6, atol=1e-9)


def compare_grads(grads: dict, t_params: dict, rtol: float):
    """Every gradient within rtol of torch's, relative to the tensor's scale (testing.assert_close).
    A gradient that is zero in exact arithmetic (e.g. attention key biases, to which softmax is
    invariant) is compared on the scale of the whole model's gradients instead of its own rounding."""
    scale = max(float(np.abs(p.grad.numpy()).max()) for p in t_params.values())
    for name, p in t_params.items():
        e = p.grad.numpy()
        floor = rtol * 1e-3 * scale if float(np.abs(e).max()) < 1e-9 * scale else None
        assert_close(grads[name], e, name, rtol, atol=floor)


def sampled_gradient_check(model, ids, mask, labels, seed, per_tensor=3):
    """Central differences of the loss at a few sampled elements of every parameter."""
    model.forward(ids, mask, labels)
    model.zero_grad()
    model.backward()
    rng = np.random.default_rng(seed)

    def loss():
        return model.forward(ids, mask, labels).loss

    for name, m, k in model.named_parameters(trainable_only=True):
        p = m.params[k]
        flat = p.reshape(-1)
        idx = rng.choice(flat.size, size=min(per_tensor, flat.size), replace=False)
        view = flat[idx].copy()  # the sampled entries as their own array, written back on each eval
        analytic = to_host(m.grads[k]).reshape(-1)[idx]

        def f():
            flat[idx] = view
            return loss()

        num = numerical_gradient(f, view)
        flat[idx] = view
        assert_close(analytic, num, f"d{name}", 1e-6, atol=1e-9)


@settings(max_examples=4)
@given(B=st.integers(1, 3), T=st.integers(2, 6), H=st.sampled_from([1, 2]), hd=st.integers(2, 4),
       L=st.integers(1, 2), seed=st.integers(0, 2**16), act=st.sampled_from(["gelu_new", "gelu", "relu"]))
def test_whole_model_central_differences(B, T, H, hd, L, seed, act):
    cfg = tiny_config(n_embd=H * hd, n_head=H, n_layer=L, n_positions=T, activation_function=act)
    model = GPT2LMHeadModel(cfg, get_backend("cpu", "float64"), seed=seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    labels = np.where(mask == 1, ids, -100)
    sampled_gradient_check(model, ids, mask, labels, seed)


def test_central_differences_with_every_dropout_on():
    """Dropout wiring: with the mask generator's state restored before each forward, the masks are
    fixed and the loss is a differentiable function of the parameters."""
    cfg = tiny_config(n_layer=1, resid_pdrop=0.3, embd_pdrop=0.2, attn_pdrop=0.25)
    model = GPT2LMHeadModel(cfg, get_backend("cpu", "float64"), seed=11)
    ids, mask, labels = batch(7, B=2, T=5, lengths=(5, 4))
    gen = model.transformer.rng.bit_generator
    state = gen.state
    forward = model.forward

    def fixed_masks_forward(*a, **k):
        gen.state = state
        return forward(*a, **k)

    model.forward = fixed_masks_forward
    sampled_gradient_check(model, ids, mask, labels, seed=3)


def test_causal_later_tokens_never_change_earlier_logits(backend64):
    model = GPT2LMHeadModel(tiny_config(), backend64, seed=0)
    ids, _, _ = batch(2, B=2, T=10, lengths=(10, 10))
    a = to_host(model.forward(ids).logits)
    ids2 = ids.copy()
    ids2[:, 6:] = (ids2[:, 6:] + 5) % V
    b = to_host(model.forward(ids2).logits)
    assert_close(b[:, :6], a[:, :6], "earlier logits", 1e-13)
    assert np.abs(b[:, 6:] - a[:, 6:]).max() > 1e-6, "later logits must depend on the changed tokens"


def test_padding_never_changes_real_outputs(backend64):
    model = GPT2LMHeadModel(tiny_config(), backend64, seed=1)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, V, (1, 5))
    alone = to_host(model.forward(ids).logits)
    padded_ids = np.concatenate([ids, rng.integers(0, V, (1, 4))], axis=1)
    mask = np.array([[1] * 5 + [0] * 4])
    padded = to_host(model.forward(padded_ids, mask).logits)
    assert_close(padded[:, :5], alone, "real positions", 1e-12)


def test_same_seed_bitwise_identical_with_dropout():
    be = get_backend("cpu", "float32")
    cfg = tiny_config(resid_pdrop=0.2, embd_pdrop=0.3, attn_pdrop=0.1)
    ids, mask, labels = batch(3)
    losses, grads = [], []
    for _ in range(2):
        m = GPT2LMHeadModel(cfg, be, seed=7)
        losses.append(m.forward(ids, mask, labels).loss)
        m.backward()
        grads.append(m.named_grads()["transformer.h.0.mlp.c_fc.weight"].copy())
    assert losses[0] == losses[1]
    assert np.array_equal(grads[0], grads[1])
    m.eval()
    eval_loss = m.forward(ids, mask, labels).loss
    assert eval_loss != losses[0], "dropout must act in training mode"


def test_inputs_never_mutated(backend64):
    model = GPT2LMHeadModel(tiny_config(), backend64)
    ids, mask, labels = batch(5)
    G = np.random.default_rng(0).standard_normal((3, 8, V))
    copies = [a.copy() for a in (ids, mask, labels, G)]
    model.forward(ids, mask, labels)
    model.backward()
    model.forward(ids, mask)
    model.backward(G)
    for a, c in zip((ids, mask, labels, G), copies):
        assert np.array_equal(a, c)


def test_tied_head_has_no_separate_parameter():
    model = GPT2LMHeadModel(tiny_config(), get_backend("cpu", "float64"))
    names = [n for n, _, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert len(names) == 4 + 12 * 2  # wte, wpe, ln_f (2) + 12 per block
    C, F = 12, 48
    per_block = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * F + F) + (F * C + C)
    assert model.num_parameters() == V * C + 12 * C + 2 * C + 2 * per_block


@pytest.mark.parametrize("bad, match", [
    (dict(input_ids=np.zeros((2, 13), np.int64)), "exceeds n_positions"),
    (dict(input_ids=np.full((2, 3), V, np.int64)), "outside"),
    (dict(input_ids=np.zeros((2, 3), np.float64)), "integer"),
    (dict(input_ids=np.zeros(3, np.int64)), "shape"),
    (dict(attention_mask=np.ones((2, 4))), "attention_mask"),
    (dict(attention_mask=np.full((2, 3), 2)), "only 0"),
    (dict(labels=np.zeros((2, 4), np.int64)), "labels"),
    (dict(labels=np.full((2, 3), V, np.int64)), "labels"),
    (dict(token_type_ids=np.zeros((2, 3), np.int64)), "token_type_ids"),
])
def test_bad_inputs_raise_before_work(bad, match):
    model = GPT2LMHeadModel(tiny_config(), get_backend("cpu", "float64"))
    kw = dict(input_ids=np.zeros((2, 3), np.int64))
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        model.forward(**kw)
    assert model.activation_bytes() == 0, "nothing may be computed before the error"


@pytest.mark.parametrize("kw, match", [
    (dict(n_embd=10, n_head=3), "divisible"),
    (dict(activation_function="gelu_fast_unknown"), "known"),
    (dict(n_layer=0), r"n_layer must be an integer >= 1"),
    (dict(resid_pdrop=1.0), "probability"),
    (dict(tie_word_embeddings=False), "tied"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_config_from_hf_dict_ignores_unknown_keys():
    d = transformers.GPT2Config(n_embd=16, n_head=4, n_layer=3, vocab_size=50).to_dict()
    cfg = GPT2Config.from_dict(d)
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size) == (16, 4, 3, 50)
    assert GPT2Config.from_dict(cfg.to_dict()) == cfg


def test_backward_errors():
    model = GPT2LMHeadModel(tiny_config(), get_backend("cpu", "float64"))
    with pytest.raises(RuntimeError, match="without a forward"):
        model.backward()
    model.forward(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="dlogits"):
        model.backward()
    with pytest.raises(ValueError, match="shape"):
        model.backward(np.zeros((2, 3, 5)))


def test_memory_report_counts_each_array_once():
    from spectral_peft.optim import AdamW

    model = GPT2LMHeadModel(tiny_config(), get_backend("cpu", "float64"))
    opt = AdamW(model)
    ids, mask, labels = batch(6)
    model.forward(ids, mask, labels)
    rep = memory_report(model, opt)
    n = model.num_parameters()
    assert rep["trainable_param_bytes"] == 8 * n and rep["frozen_param_bytes"] == 0
    assert rep["optimizer_bytes"] == 0 and rep["grad_bytes"] == 0
    B, T, H = 3, 8, 3
    # at least the attention probabilities and the (N, V) cross-entropy exponentials are cached
    assert rep["activation_bytes"] >= 8 * (2 * B * H * T * T + B * T * V)
    model.backward()
    opt.step()
    rep = memory_report(model, opt)
    assert rep["grad_bytes"] == 8 * n and rep["optimizer_bytes"] == 2 * 8 * n
    assert rep["activation_bytes"] == 0, "backward consumes every cache"
    model.transformer.h[0].attn.c_attn.freeze("weight")
    rep = memory_report(model)
    assert rep["frozen_param_bytes"] == 8 * 12 * 36
