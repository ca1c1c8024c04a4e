"""The public API: `import spectral_peft as sp` and the README's five-line first script, run as
a learner runs it (the code block is read from README.md, not copied here)."""
import os
import re

import numpy as np
import pytest

import spectral_peft as sp
from spectral_peft.adapters.peft_model import PeftModel as EnginePeftModel
from spectral_peft.adapters.registry import METHODS
from spectral_peft.io.safe import FileFormatError, load_json, load_safetensors

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _first_script() -> str:
    text = open(README, encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    script = next(b for b in blocks if b.startswith("import spectral_peft as sp"))
    return script


def test_the_readme_script_is_five_lines():
    assert len(_first_script().strip().splitlines()) == 5


def test_the_readme_script_trains_and_writes_peft_files(tmp_path, monkeypatch):
    cfg = sp.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    sp.save_pretrained(sp.GPT2LMHeadModel(cfg, sp.get_backend("cpu", "float64"), seed=1), tmp_path / "my-gpt2")
    tokens = np.random.default_rng(0).integers(0, 64, size=2000)
    monkeypatch.chdir(tmp_path)
    scope = {"tokens": tokens}
    exec(compile(_first_script(), "README.md", "exec"), scope)  # the README's own code, as written
    peft = scope["peft"]
    assert isinstance(peft, EnginePeftModel)
    config = load_json(tmp_path / "my-adapter" / "adapter_config.json")
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16)
    arrays = load_safetensors(tmp_path / "my-adapter" / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    assert arrays[key].shape == (48, 8) and np.abs(arrays[key]).max() > 0  # B left zero: it trained
    loaded = sp.PeftModel.from_pretrained(sp.GPT2LMHeadModel.from_pretrained(tmp_path / "my-gpt2", dtype="float64"),
                                          tmp_path / "my-adapter")
    ids = tokens[:32].reshape(1, 32)
    peft.eval()
    loaded.eval()
    np.testing.assert_array_equal(sp.to_host(loaded.forward(ids).logits), sp.to_host(peft.forward(ids).logits))


def test_the_api_names_pefts_configs_and_every_method():
    for name in ("LoraConfig", "AdaLoraConfig", "RosaConfig", "DoraConfig", "DyLoraConfig", "LoraFAConfig",
                 "DeltaLoraConfig", "get_peft_model", "merge_and_unload", "PeftModel", "Trainer",
                 "quantize_4bit", "dequantize_4bit", "GPT2LMHeadModel", "BertModel", "BertForSequenceClassification",
                 "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "LlamaConfig", "MistralConfig",
                 "Qwen2Config", "generate", "GenerateOutput"):
        assert hasattr(sp, name), name
    assert set(sp.__all__) <= set(dir(sp))
    assert METHODS[0] == "full" and len(METHODS) == len(set(METHODS)) >= 11
    from spectral_peft.commands.run_options import DEFAULT_METHODS

    assert set(DEFAULT_METHODS) <= set(METHODS) and len(DEFAULT_METHODS) == 11


def test_from_pretrained_refuses_another_architecture(tmp_path):
    cfg = sp.GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    sp.save_pretrained(sp.GPT2LMHeadModel(cfg, sp.get_backend("cpu", "float32")), tmp_path / "g")
    with pytest.raises(FileFormatError, match=r"holds a GPT2LMHeadModel, not a BertModel"):
        sp.BertModel.from_pretrained(tmp_path / "g")


def test_generate_is_a_verb_of_every_causal_lm_and_of_the_peft_model(tmp_path):
    cfg = sp.MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    sp.save_pretrained(sp.MistralForCausalLM(cfg, sp.get_backend("cpu", "float64"), seed=2), tmp_path / "m")
    model = sp.MistralForCausalLM.from_pretrained(tmp_path / "m", dtype="float64")
    ids, mask = np.array([[0, 5, 6], [7, 8, 9]]), np.array([[0, 1, 1], [1, 1, 1]])
    out = model.generate(ids, mask, max_new_tokens=5)
    assert isinstance(out, sp.GenerateOutput) and out.sequences.shape == (2, 8)
    np.testing.assert_array_equal(out.sequences, sp.generate(model, ids, mask, max_new_tokens=5).sequences)
    peft = sp.get_peft_model(model, sp.LoraConfig(r=2, target_modules=["q_proj"]))  # B = 0: same tokens
    np.testing.assert_array_equal(peft.generate(ids, mask, max_new_tokens=5).sequences, out.sequences)
