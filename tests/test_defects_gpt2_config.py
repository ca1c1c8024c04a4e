"""GPT-2's attention-scaling config fields, forward and backward, against transformers in float64:
scale_attn_by_inverse_layer_idx (block i's scores times 1/(i + 1)), scale_attn_weights=False (no
1/√hd) and reorder_and_upcast_attn (transformers' _upcast_and_reordered_attn: the scale applied to
q before the product, computed in float32 even in a float64 model; the engine computes the same
maths in its own dtype, so it is compared with transformers' float64 eager path at 1e-10 and with
transformers' own path in a float32 model at a float32 tolerance: in a float64 model that path
raises, "attn_weights does not have dtype torch.float32", as the float64 mask promotes the scores). Config fields that change the maths and are not
implemented are refused by name at load (GPT-2 and BERT)."""
import json

import numpy as np
import pytest

from spectral_peft.backend import get_backend
from spectral_peft.model import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                                 hf_gradients, load_pretrained, save_pretrained)
from spectral_peft.testing import assert_close, numerical_gradient

V = 19
FLAGS = {"inverse_layer_idx": {"scale_attn_by_inverse_layer_idx": True},
         "unscaled": {"scale_attn_weights": False},
         "reorder_and_upcast": {"reorder_and_upcast_attn": True},
         "inverse_and_reorder": {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True}}


def checkpoint(tmp_path, flags: dict):
    """A saved engine GPT-2 (3 blocks) whose config.json then gets ``flags`` written into it."""
    cfg = GPT2Config(vocab_size=V, n_positions=8, n_embd=12, n_layer=3, n_head=3, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    save_pretrained(GPT2LMHeadModel(cfg, get_backend("cpu", "float64"), seed=4), tmp_path)
    path = tmp_path / "config.json"
    d = json.loads(path.read_text())
    d.update(flags)
    path.write_text(json.dumps(d))
    return tmp_path


def batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (2, 7))
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
    return ids, mask, np.where(mask == 1, ids, -100)


def torch_run(torch, transformers, folder, ids, mask, labels, dtype, **overrides):
    tm = transformers.GPT2LMHeadModel.from_pretrained(str(folder), attn_implementation="eager", dtype=dtype,
                                                      **overrides).eval()
    logits = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.tensor(labels)[:, 1:].reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    return (logits.detach().double().numpy(), loss.item(),
            {n: p.grad.double().numpy() for n, p in tm.named_parameters()})


@pytest.mark.parametrize("case", list(FLAGS))
def test_logits_and_gradients_match_transformers(tmp_path, case):
    torch = pytest.importorskip("torch", reason="the peer: torch")
    transformers = pytest.importorskip("transformers", reason="the peer: transformers")
    folder = checkpoint(tmp_path, FLAGS[case])
    model = load_pretrained(folder, get_backend("cpu", "float64"))
    ids, mask, labels = batch()
    out = model.forward(ids, mask, labels)
    model.zero_grad()
    model.backward()
    grads = hf_gradients(model)
    real = mask.astype(bool)
    peers = {"float64 eager": (1e-10, torch.float64, {"reorder_and_upcast_attn": False})}
    if FLAGS[case].get("reorder_and_upcast_attn"):  # transformers' own path, in a float32 model
        peers["float32 upcast path"] = (1e-4, torch.float32, {})
    for peer, (rtol, dtype, overrides) in peers.items():
        t_logits, t_loss, t_grads = torch_run(torch, transformers, folder, ids, mask, labels, dtype, **overrides)
        assert_close(out.logits[real], t_logits[real], f"{case} logits vs transformers {peer}", rtol)
        assert_close(np.array(out.loss), np.array(t_loss), f"{case} loss vs transformers {peer}", rtol)
        scale = max(float(np.abs(g).max()) for g in t_grads.values())
        for name, g in t_grads.items():  # key biases get zero gradients: compare those on the model's scale
            atol = rtol * 1e-3 * scale if float(np.abs(g).max()) < 1e-9 * scale else None
            assert_close(grads[name], g, f"{case} {name} vs transformers {peer}", rtol, atol=atol)


def test_inverse_layer_idx_backward_passes_central_differences(tmp_path):
    model = load_pretrained(checkpoint(tmp_path, FLAGS["inverse_layer_idx"]), get_backend("cpu", "float64"))
    ids, mask, labels = batch()
    W = model.transformer.h[2].attn.c_attn.params["weight"]  # block 2: scores scaled by 1/3
    W *= 30.0  # scores of order 1, so the attention's gradient stands well above the differences' noise

    def loss():
        out = float(model.forward(ids, mask, labels).loss)
        model.clear_cache()
        return out

    model.forward(ids, mask, labels)
    model.zero_grad()
    model.backward()
    analytic = model.transformer.h[2].attn.c_attn.grads["weight"].copy()
    assert_close(analytic[:12], numerical_gradient(loss, W, eps=1e-5)[:12], "d c_attn.weight (q rows) of block 2",
                 1e-6)


@pytest.mark.parametrize("field, value", [("add_cross_attention", True)])
def test_gpt2_fields_that_change_the_maths_are_refused_by_name(tmp_path, field, value):
    folder = checkpoint(tmp_path, {field: value})
    with pytest.raises(ValueError, match=rf"{field} = {value!r} changes the model's maths and is not implemented"):
        load_pretrained(folder, get_backend("cpu", "float64"))


@pytest.mark.parametrize("field, value, match", [
    ("position_embedding_type", "relative_key", "position_embedding_type = 'relative_key' changes the model's maths"),
    ("is_decoder", True, "is_decoder = True changes the model's maths"),
    ("add_cross_attention", True, "add_cross_attention = True changes the model's maths"),
    ("classifier_dropout", 0.3, "classifier_dropout = 0.3 is not implemented"),
    ("problem_type", "multi_label_classification", "problem_type = 'multi_label_classification' is not implemented"),
])
def test_bert_fields_that_change_the_maths_are_refused_by_name(tmp_path, field, value, match):
    cfg = BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
                     max_position_embeddings=8, num_labels=3)
    save_pretrained(BertForSequenceClassification(cfg, get_backend("cpu", "float64"), seed=0), tmp_path)
    path = tmp_path / "config.json"
    d = json.loads(path.read_text())
    d[field] = value
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        load_pretrained(tmp_path, get_backend("cpu", "float64"))
