"""PEFT's adapter files: spectral_peft -> PEFT (same outputs), round trips, and bad files refused with an
error naming the file and key while the model stays exactly as it was."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer these comparisons run against")
peft = pytest.importorskip("peft", reason="peft: the PEFT peer these comparisons run against")

from spectral_peft.adapters.deltalora import DeltaLoraConfig  # noqa: E402
from spectral_peft.adapters.dylora import DyLoraConfig  # noqa: E402
from spectral_peft.adapters.lora import LoraConfig, LoraLinear  # noqa: E402
from spectral_peft.adapters.lorafa import LoraFAConfig  # noqa: E402
from spectral_peft.adapters.peft_model import get_peft_model  # noqa: E402
from spectral_peft.backend import get_backend  # noqa: E402
from spectral_peft.adapters.peft_model import load_peft_model, save_adapter  # noqa: E402
from spectral_peft.io.safe import FileFormatError, load_safetensors, save_safetensors  # noqa: E402
from spectral_peft.model import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                                 load_pretrained, save_pretrained)
from spectral_peft.testing import assert_close  # noqa: E402

transformers.logging.set_verbosity_error()
V = 23
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "bert": ["query", "key", "value", "dense"]}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    g = tmp_path_factory.mktemp("gpt2")
    save_pretrained(GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=10, n_embd=8, n_layer=1, n_head=2,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                                    get_backend("cpu", "float64"), seed=5), g)
    b = tmp_path_factory.mktemp("bert")
    save_pretrained(BertForSequenceClassification(
        BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
                   max_position_embeddings=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   num_labels=2), get_backend("cpu", "float64"), seed=6), b)
    return {"gpt2": g, "bert": b}


def inputs(kind):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, V, (2, 6))
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2])
    if kind == "bert":
        ids[mask == 0] = 0
    return ids, mask


def engine_model(ckpts, kind):
    return load_pretrained(ckpts[kind], get_backend("cpu", "float64"))


def randomise(pm, seed=0):
    """Non-zero adapter weights (B = 0 would hide mistakes)."""
    rng = np.random.default_rng(seed)
    for _, m, k in pm.named_parameters(trainable_only=True):
        m.params[k][...] = rng.uniform(0.5, 1.5, m.params[k].shape) if "magnitude" in k \
            else rng.standard_normal(m.params[k].shape) * 0.3


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"use_dora": True}],
                         ids=["lora", "rslora", "dora"])
def test_engine_adapter_loads_in_peft_with_the_same_outputs(ckpts, tmp_path, kind, extra):
    pm = get_peft_model(engine_model(ckpts, kind), LoraConfig(r=2, lora_alpha=5, target_modules=TARGETS[kind], **extra))
    randomise(pm)
    if extra.get("use_dora"):
        for _, m in pm.adapter_layers():  # m ≠ ||W + ΔW||
            m.params["lora_magnitude_vector"] *= np.linspace(0.5, 1.5, m.d_out)
    pm.eval()
    ids, mask = inputs(kind)
    logits = pm.forward(ids, mask).logits
    save_adapter(pm, tmp_path)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] == (kind == "gpt2")
    cls = transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.BertForSequenceClassification
    tm = cls.from_pretrained(str(ckpts[kind]), attn_implementation="eager", dtype=torch.float64)
    pm_t = peft.PeftModel.from_pretrained(tm, str(tmp_path)).eval()
    t_logits = pm_t(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy()
    real = mask.astype(bool) if kind == "gpt2" else slice(None)
    assert_close(logits[real], t_logits[real], "logits", 1e-10)
    # and the round trip through the engine gives the same arrays and outputs
    pm2 = load_peft_model(engine_model(ckpts, kind), tmp_path)
    pm2.eval()
    for name, a in pm.trainable_state().items():
        assert np.array_equal(pm2.trainable_state()[name], a), name
    assert np.array_equal(pm2.forward(ids, mask).logits, logits)


@pytest.mark.parametrize("config", [
    DyLoraConfig(r=3, target_modules=["c_attn"]),
    LoraFAConfig(r=3, target_modules=["c_attn"]),
    DeltaLoraConfig(r=3, target_modules=["c_attn"]),
], ids=["dylora", "lorafa", "deltalora"])
def test_variants_are_written_as_plain_lora(ckpts, tmp_path, config):
    pm = get_peft_model(engine_model(ckpts, "gpt2"), config)
    randomise(pm)
    for _, m in pm.adapter_layers():
        m.params["lora_A.weight"][...] = np.random.default_rng(1).standard_normal(m.params["lora_A.weight"].shape)
    pm.eval()
    ids, mask = inputs("gpt2")
    logits = pm.forward(ids, mask).logits  # DyLoRA evaluates at r_max: exactly the LoRA the file describes
    save_adapter(pm, tmp_path)
    assert json.load(open(tmp_path / "adapter_config.json"))["peft_type"] == "LORA"
    keys = sorted(load_safetensors(tmp_path / "adapter_model.safetensors"))
    assert keys == ["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
                    "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    pm2 = load_peft_model(engine_model(ckpts, "gpt2"), tmp_path)
    assert type(pm2.model.transformer.h[0].attn.c_attn) is LoraLinear
    pm2.eval()
    assert_close(pm2.forward(ids, mask).logits, logits, "logits", 1e-12)


# --- bad files: clear errors, nothing half-loaded ------------------------------------------------------
def snapshot(model):
    return ({n: (type(m).__name__, sorted(m.frozen), sorted(m.grads)) for n, m in model.named_modules()},
            {k: v.copy() for k, v in model.state_dict().items()})


def assert_untouched(model, snap):
    mods, params = snapshot(model)
    assert mods == snap[0]
    assert params.keys() == snap[1].keys()
    for k, v in params.items():
        assert np.array_equal(v, snap[1][k]), k


@pytest.fixture
def good_adapter(ckpts, tmp_path):
    pm = get_peft_model(engine_model(ckpts, "gpt2"), LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    randomise(pm)
    save_adapter(pm, tmp_path)
    return tmp_path


def rewrite_arrays(directory, edit):
    path = directory / "adapter_model.safetensors"
    arrays = load_safetensors(path)
    edit(arrays)
    save_safetensors(arrays, path)


def rewrite_config(directory, edit):
    path = directory / "adapter_config.json"
    cfg = json.load(open(path))
    edit(cfg)
    path.write_text(json.dumps(cfg))


KEY = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"


@pytest.mark.parametrize("case, edit_arrays, edit_config, match", [
    ("wrong shape", lambda a: a.__setitem__(KEY, np.zeros((2, 9))), None,
     rf"adapter_model.safetensors: key '{KEY}': shape \(2, 9\), expected \(2, 8\)"),
    ("missing key", lambda a: a.pop(KEY), None, rf"adapter_model.safetensors: key '{KEY}': missing"),
    ("unknown key", lambda a: a.__setitem__("base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight",
                                           np.zeros((2, 32))), None,
     r"key 'base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight': no adapted layer"),
    ("rank differs from the arrays", None, lambda c: c.update(r=9),
     rf"adapter_model.safetensors: key '{KEY}': shape \(2, 8\), expected \(9, 8\)"),
    ("r <= 0", None, lambda c: c.update(r=0), r"adapter_config.json: LoraConfig.r must be an integer > 0, got 0"),
    ("alpha <= 0", None, lambda c: c.update(lora_alpha=-1), r"adapter_config.json: LoraConfig.lora_alpha"),
    ("no such module", None, lambda c: c.update(target_modules=["c_attn", "q_proj"]),
     r"\['q_proj'\] match no linear layer; the linear layers are named \['c_attn', 'c_fc', 'c_proj'\]"),
    ("peft_type", None, lambda c: c.update(peft_type="IA3"), r"unsupported peft_type 'IA3'"),
])
def test_bad_adapter_files_are_refused_and_the_model_is_untouched(ckpts, good_adapter, case, edit_arrays,
                                                                   edit_config, match):
    if edit_arrays:
        rewrite_arrays(good_adapter, edit_arrays)
    if edit_config:
        rewrite_config(good_adapter, edit_config)
    model = engine_model(ckpts, "gpt2")
    snap = snapshot(model)
    with pytest.raises(FileFormatError, match=match):
        load_peft_model(model, good_adapter)
    assert_untouched(model, snap)


def test_missing_files_and_a_model_that_already_has_adapters(ckpts, good_adapter, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileFormatError, match="adapter_config.json: file not found"):
        load_peft_model(engine_model(ckpts, "gpt2"), empty)
    os.remove(good_adapter / "adapter_model.safetensors")
    model = engine_model(ckpts, "gpt2")
    snap = snapshot(model)
    with pytest.raises(FileFormatError, match="adapter_model.safetensors: file not found"):
        load_peft_model(model, good_adapter)
    assert_untouched(model, snap)


def test_failure_while_installing_rolls_back(ckpts, good_adapter, monkeypatch):
    """Even a failure after injection (here forced in the last layer's load) leaves the model as it was."""
    model = engine_model(ckpts, "gpt2")
    snap = snapshot(model)
    calls = []
    original = LoraLinear.load_peft_state_dict

    def flaky(self, arrays):
        calls.append(self)
        if len(calls) == 4:  # 2 layers checked off-model, then the 2nd installed one fails
            raise RuntimeError("disk vanished")
        return original(self, arrays)

    monkeypatch.setattr(LoraLinear, "load_peft_state_dict", flaky)
    with pytest.raises(RuntimeError, match="disk vanished"):
        load_peft_model(model, good_adapter)
    assert len(calls) == 4
    assert_untouched(model, snap)
