"""Hugging Face files: loading checkpoints written by transformers (with and without the
"transformer." prefix, with mask buffers), the Conv1D transposition, saving that transformers
reads back, and every validation error raised before anything is installed."""
import json
import re
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from spectral_peft.backend import get_backend
from spectral_peft.io.safe import FileFormatError
from spectral_peft.model import (BertForSequenceClassification, BertModel, GPT2LMHeadModel, hf_gradients,
                                 hf_key, load_pretrained, save_pretrained)
from spectral_peft.testing import assert_close

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer these comparisons run against")
transformers.logging.set_verbosity_error()

BE = get_backend("cpu", "float64")


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory):
    """A checkpoint written by transformers itself (an independent writer)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=17, n_positions=9, n_embd=8, n_layer=2, n_head=2, n_inner=12,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    tm = transformers.GPT2LMHeadModel(cfg).double()
    d = tmp_path_factory.mktemp("hf_gpt2")
    tm.save_pretrained(str(d))
    return d, tm


def rewrite(src, dst, edit_arrays=None, edit_config=None):
    """Copy a checkpoint directory, editing its tensors and/or config."""
    os.makedirs(dst, exist_ok=True)
    arrays = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    if edit_arrays:
        arrays = edit_arrays(arrays)
    if edit_config:
        cfg = edit_config(cfg)
    save_file(arrays, os.path.join(dst, "model.safetensors"))
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_loads_transformers_checkpoint_and_transposes_conv1d(hf_gpt2_dir):
    d, tm = hf_gpt2_dir
    model = load_pretrained(d, BE)
    assert isinstance(model, GPT2LMHeadModel)
    assert model.config.n_inner == 12
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    c_fc = model.transformer.h[1].mlp.c_fc.params["weight"]
    assert sd["transformer.h.1.mlp.c_fc.weight"].shape == (8, 12)  # Conv1D: (d_in, d_out)
    assert c_fc.shape == (12, 8)  # Linear: (d_out, d_in)
    assert np.array_equal(c_fc, sd["transformer.h.1.mlp.c_fc.weight"].T)
    assert np.array_equal(model.transformer.wte.params["weight"], sd["transformer.wte.weight"])
    ids = np.array([[1, 5, 7, 2, 0]])
    out = model.forward(ids)
    ref = tm(input_ids=torch.tensor(ids)).logits.detach().numpy()
    assert_close(out.logits, ref, "logits", 1e-10)


def test_keys_without_prefix_and_with_mask_buffers(hf_gpt2_dir, tmp_path):
    d, tm = hf_gpt2_dir

    def openai_layout(arrays):
        out = {k[len("transformer."):]: v for k, v in arrays.items()}
        for i in range(2):
            out[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 9, 9), np.float32))
            out[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
        return out

    d2 = rewrite(d, tmp_path / "old", openai_layout)
    model = load_pretrained(d2, BE)
    assert hf_key(model, "transformer.h.0.attn.c_attn.weight") == "h.0.attn.c_attn.weight"
    ids = np.array([[3, 4, 5]])
    out = model.forward(ids, labels=ids)
    model.backward()
    grads = hf_gradients(model)
    assert "wte.weight" in grads and "h.1.mlp.c_proj.weight" in grads
    assert grads["h.1.mlp.c_proj.weight"].shape == (12, 8)  # written back in the file's Conv1D layout
    tout = tm(input_ids=torch.tensor(ids), labels=torch.tensor(ids))
    assert_close(out.logits, tout.logits.detach().numpy(), "logits", 1e-10)


def test_tied_head_key_in_file_must_match(hf_gpt2_dir, tmp_path):
    d, _ = hf_gpt2_dir
    same = rewrite(d, tmp_path / "same", lambda a: {**a, "lm_head.weight": a["transformer.wte.weight"].copy()})
    model = load_pretrained(same, BE)
    ids = np.array([[1, 2, 3]])
    model.forward(ids, labels=ids)
    model.backward()
    g = hf_gradients(model)
    assert np.array_equal(g["lm_head.weight"], g["transformer.wte.weight"])
    diff = rewrite(d, tmp_path / "diff", lambda a: {**a, "lm_head.weight": a["transformer.wte.weight"] + 1})
    with pytest.raises(FileFormatError, match="lm_head.weight.*tied"):
        load_pretrained(diff, BE)


@pytest.mark.parametrize("edit, match", [
    (lambda a: {k: v for k, v in a.items() if k != "transformer.h.1.ln_2.bias"}, r"transformer\.h\.1\.ln_2\.bias.*missing"),
    (lambda a: {**a, "transformer.h.0.attn.c_attn.weight": np.zeros((24, 8), np.float32)},
     r"c_attn\.weight.*shape \(24, 8\), expected \(8, 24\)"),
    (lambda a: {**a, "transformer.extra.weight": np.zeros(3, np.float32)}, r"transformer\.extra\.weight.*unexpected"),
])
def test_bad_checkpoints_name_the_key(hf_gpt2_dir, tmp_path, edit, match):
    d, _ = hf_gpt2_dir
    bad = rewrite(d, tmp_path / "bad", edit)
    with pytest.raises(FileFormatError, match=match):
        load_pretrained(bad, BE)


def test_unsupported_model_type_names_supported(hf_gpt2_dir, tmp_path):
    d, _ = hf_gpt2_dir
    bad = rewrite(d, tmp_path / "t5", edit_config=lambda c: {**c, "model_type": "t5"})
    with pytest.raises(FileFormatError, match=r"unsupported model_type 't5'.*gpt2.*bert.*llama"):
        load_pretrained(bad, BE)


@pytest.mark.parametrize("model_type, key", [("llama", "model.embed_tokens.weight"),
                                             ("bert", "embeddings.word_embeddings.weight")])
def test_config_of_another_model_fails_before_building(hf_gpt2_dir, tmp_path, monkeypatch, model_type, key):
    """GPT-2 weights under another model_type: the config's defaults (a 7B Llama) would be allocated
    before the keys are compared; they are compared with a memoryless skeleton, and no model is built."""
    d, _ = hf_gpt2_dir
    bad = rewrite(d, tmp_path / model_type, edit_config=lambda c: {**c, "model_type": model_type})
    import spectral_peft.model.hf as hf
    from spectral_peft.backend import ShapeBackend

    real_new_model = hf.new_model

    def only_skeletons(model_type, config, arrays, backend, seed=0):
        if not isinstance(backend, ShapeBackend):
            pytest.fail("a model was built")
        return real_new_model(model_type, config, arrays, backend, seed)

    monkeypatch.setattr(hf, "new_model", only_skeletons)
    with pytest.raises(FileFormatError, match=re.escape(key) + ".*missing"):
        load_pretrained(bad, BE)


def test_embedding_shape_checked_before_building(hf_gpt2_dir, tmp_path):
    d, _ = hf_gpt2_dir
    bad = rewrite(d, tmp_path / "vocab", edit_config=lambda c: {**c, "vocab_size": c["vocab_size"] + 1})
    with pytest.raises(FileFormatError, match=r"transformer\.wte\.weight.*expected \(\d+, \d+\)"):
        load_pretrained(bad, BE)


def test_bad_config_value_is_named(hf_gpt2_dir, tmp_path):
    d, _ = hf_gpt2_dir
    bad = rewrite(d, tmp_path / "act", edit_config=lambda c: {**c, "activation_function": "nope"})
    with pytest.raises(FileFormatError, match="activation_function"):
        load_pretrained(bad, BE)


def test_nothing_installed_when_validation_fails(hf_gpt2_dir, tmp_path, monkeypatch):
    """Validation completes before the first array is installed: a failure on the last key leaves
    every module of the model under construction untouched."""
    d, _ = hf_gpt2_dir
    bad = rewrite(d, tmp_path / "late", lambda a: {**a, "transformer.ln_f.bias": np.zeros(5, np.float32)})
    built = []
    orig = GPT2LMHeadModel.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        built.append((self, {n: m.params[k].copy() for n, m, k in self.named_parameters()}))

    monkeypatch.setattr(GPT2LMHeadModel, "__init__", spy)
    with pytest.raises(FileFormatError, match="ln_f.bias"):
        load_pretrained(bad, BE)
    model, before = built[0]
    for n, m, k in model.named_parameters():
        assert np.array_equal(m.params[k], before[n]), f"{n} was installed before validation finished"


def test_save_then_transformers_loads_same_weights(tmp_path):
    from spectral_peft.model import GPT2Config

    model = GPT2LMHeadModel(GPT2Config(vocab_size=13, n_positions=6, n_embd=6, n_layer=1, n_head=2), BE, seed=5)
    save_pretrained(model, tmp_path)
    tm = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path), dtype=torch.float64)
    sd = tm.state_dict()
    assert np.array_equal(sd["transformer.h.0.attn.c_attn.weight"].numpy(),
                          model.transformer.h[0].attn.c_attn.params["weight"].T)
    assert np.array_equal(sd["lm_head.weight"].numpy(), model.transformer.wte.params["weight"])
    back = load_pretrained(tmp_path, BE)
    for (n, m, k), (n2, m2, k2) in zip(model.named_parameters(), back.named_parameters()):
        assert n == n2 and np.array_equal(m.params[k], m2.params[k2])


def test_bert_loading_picks_the_class(tmp_path):
    from spectral_peft.model import BertConfig

    cfg = BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=10,
                     max_position_embeddings=6, num_labels=4)
    save_pretrained(BertForSequenceClassification(cfg, BE), tmp_path / "cls")
    save_pretrained(BertModel(cfg, BE), tmp_path / "bare")
    assert isinstance(load_pretrained(tmp_path / "cls", BE), BertForSequenceClassification)
    assert load_pretrained(tmp_path / "cls", BE).config.num_labels == 4
    assert type(load_pretrained(tmp_path / "bare", BE)) is BertModel
    # transformers writes the bare model's keys without "bert."; a BertForSequenceClassification
    # file without its classifier (e.g. a base checkpoint saved from a task model) keeps "bert."
    tb = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "cls"))
    tb.bert.save_pretrained(str(tmp_path / "hf_bare"))
    m = load_pretrained(tmp_path / "hf_bare", BE)
    assert type(m) is BertModel and m.pooler is not None
    prefixed = rewrite(tmp_path / "cls", tmp_path / "prefixed",
                       lambda a: {k: v for k, v in a.items() if not k.startswith("classifier.")})
    m2 = load_pretrained(prefixed, BE)
    assert type(m2) is BertModel and hf_key(m2, "embeddings.word_embeddings.weight") == "bert.embeddings.word_embeddings.weight"
