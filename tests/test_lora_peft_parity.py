"""Whole-model parity with transformers + PEFT 0.21.2 in float64: LoRA, rsLoRA and DoRA on GPT-2 and
BERT, padded batches, random non-zero adapter weights.

PEFT builds and initialises the adapter (init_lora_weights=False: B != 0; DoRA's magnitudes are then
scaled randomly so m ≠ ||W + ΔW||), writes it with ``save_pretrained``, and the engine loads that file
with ``load_peft_model``: so the file direction PEFT -> spectral_peft is exercised as well. Then the
logits, the loss and the gradient of every adapter parameter must agree to 1e-10 (relative to each
tensor's scale).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer these comparisons run against")
peft = pytest.importorskip("peft", reason="peft: the PEFT peer these comparisons run against")

from spectral_peft.backend import get_backend  # noqa: E402
from spectral_peft.adapters.peft_model import load_peft_model  # noqa: E402
from spectral_peft.model import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                                 load_pretrained, save_pretrained)
from spectral_peft.testing import assert_close  # noqa: E402

transformers.logging.set_verbosity_error()

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
BERT_TARGETS = ["query", "key", "value", "dense"]
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
V = 29


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    g = tmp_path_factory.mktemp("gpt2")
    save_pretrained(GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=12, n_embd=16, n_layer=2, n_head=2,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                                    get_backend("cpu", "float64"), seed=1), g)
    b = tmp_path_factory.mktemp("bert")
    save_pretrained(BertForSequenceClassification(
        BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                   max_position_embeddings=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   num_labels=3), get_backend("cpu", "float64"), seed=2), b)
    return {"gpt2": g, "bert": b}


def padded_batch(kind, seed=0, B=3, T=8, lengths=(8, 5, 2)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, (B, T))
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    if kind == "gpt2":
        return dict(input_ids=ids, attention_mask=mask, labels=np.where(mask == 1, ids, -100))
    ids[mask == 0] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=rng.integers(0, 2, (B, T)),
                labels=np.array([2, 0, 1]))


def torch_peft(kind, ckpt, variant, seed=0, r=4, alpha=6):
    cls = transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.BertForSequenceClassification
    tm = cls.from_pretrained(str(ckpt), attn_implementation="eager", dtype=torch.float64)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=GPT2_TARGETS if kind == "gpt2" else BERT_TARGETS,
                          init_lora_weights=False, lora_dropout=0.0, **VARIANTS[variant])
    pm = peft.get_peft_model(tm, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:  # m ≠ ||W + ΔW||: the rescaling is exercised
                p.mul_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
    return pm.eval()


def engine_key(torch_name: str) -> str:
    """PEFT's parameter name -> its adapter-file key (the adapter name dropped)."""
    return torch_name.replace(".default.weight", ".weight").replace("lora_magnitude_vector.weight",
                                                                     "lora_magnitude_vector")


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_and_adapter_gradients_match_peft(ckpts, tmp_path, kind, variant):
    pm_t = torch_peft(kind, ckpts[kind], variant)
    pm_t.save_pretrained(str(tmp_path))
    pm = load_peft_model(load_pretrained(ckpts[kind], get_backend("cpu", "float64")), tmp_path)
    pm.eval()
    data = padded_batch(kind)
    out = pm.forward(**data)
    pm.zero_grad()
    pm.backward()
    if kind == "gpt2":  # transformers computes the causal-LM loss in float32: write it out in float64
        t_out = pm_t(**{k: torch.tensor(v) for k, v in data.items() if k != "labels"})
        Vv = t_out.logits.shape[-1]
        t_loss = torch.nn.functional.cross_entropy(t_out.logits[:, :-1].reshape(-1, Vv),
                                                   torch.tensor(data["labels"])[:, 1:].reshape(-1), ignore_index=-100)
    else:
        t_out = pm_t(**{k: torch.tensor(v) for k, v in data.items()})
        t_loss = t_out.loss
    t_loss.backward()
    if kind == "gpt2":
        real = data["attention_mask"].astype(bool)
        assert_close(out.logits[real], t_out.logits.detach().numpy()[real], "logits", 1e-10)
    else:
        assert_close(out.logits, t_out.logits.detach().numpy(), "logits", 1e-10)
    assert_close(np.array(out.loss), np.array(t_loss.item()), "loss", 1e-10)
    t_grads = {engine_key(n): p.grad.numpy() for n, p in pm_t.named_parameters() if p.requires_grad}
    grads = pm.named_grads()
    assert set(grads) == set(t_grads), "the same trainable parameters, under PEFT's file keys"
    linears = {"gpt2": 2 * 4, "bert": 2 * 6 + 1}[kind]  # BERT: "dense" also names the pooler's
    n_expected = linears * (3 if variant == "dora" else 2)
    assert len(grads) == n_expected
    for name, g in t_grads.items():
        assert np.abs(g).max() > 0, name  # a real gradient, not an all-zero one
        assert_close(grads[name], g, name, 1e-10)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_trainable_parameter_count_equals_peft_and_the_formula(ckpts, kind):
    from spectral_peft.adapters.lora import LoraConfig
    from spectral_peft.adapters.peft_model import get_peft_model

    r = 4
    pm_t = torch_peft(kind, ckpts[kind], "lora", r=r)
    model = load_pretrained(ckpts[kind], get_backend("cpu", "float64"))
    pm = get_peft_model(model, LoraConfig(r=r, target_modules=GPT2_TARGETS if kind == "gpt2" else BERT_TARGETS))
    formula = sum(r * (m.d_in + m.d_out) for _, m in pm.adapter_layers())
    C = 16
    if kind == "gpt2":  # per block: c_attn C->3C, attn.c_proj C->C, c_fc C->4C, mlp.c_proj 4C->C
        assert formula == 2 * r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert pm.num_parameters(trainable_only=True) == formula
    assert formula == sum(p.numel() for p in pm_t.parameters() if p.requires_grad)
