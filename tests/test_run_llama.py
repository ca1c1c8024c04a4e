"""`spectral-peft run --arch llama`: the main job on a small Llama base; the default stays GPT-2.

Expected values come from the Llama shapes the option promises (C width, L layers, H heads, V = 256),
not from the code under test. At --quick's C = 32, H = 2: Hkv = H/2 = 1 key/value head of width
hd = C/H = 16, SwiGLU width F = 8C/3 = 85.3 rounded to a multiple of 8 = 88.
    LoRA budget  = r · Σ (d_in + d_out) over q_proj (C→C), k_proj and v_proj (C→Hkv·hd = C/2),
                   o_proj (C→C), gate_proj and up_proj (C→F), down_proj (F→C)
                 = r · (2C + 1.5C + 1.5C + 2C + 3(C + F)) per layer
    base params  = V·C + L·(C² + 2·C·C/2 + C² + 3·C·F + 2C) + C   (tied head; RMSNorm weights only)
"""
import json
import os

import pytest

from spectral_peft import cli
from spectral_peft.backend import get_backend
from spectral_peft.commands.run_options import QUICK, RunConfig, config_from_args
from spectral_peft.model import LlamaForCausalLM
from spectral_peft.model.hf import load_pretrained
from spectral_peft.results import load_results

pytestmark = pytest.mark.slow

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["lora", "qlora", "adalora"]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_llama")
    out, cache = root / "runs", root / "cache"
    argv = ["run", "--quick", "--arch", "llama", "--methods", ",".join(METHODS), "--figures", "false",
            "--out", str(out), "--cache-dir", str(cache), "--progress", "false"]
    return out, cache, argv


def test_run_arch_llama_fine_tunes_a_llama_base(llama_run, capsys):
    out, cache, argv = llama_run
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    results = load_results(str(out / "latest"))
    C, L, r, V, F = QUICK["n_embd"], QUICK["n_layer"], QUICK["r"], 256, 88

    assert results["config"]["arch"] == "llama"
    assert results["config"]["target_modules"] == ",".join(LLAMA_TARGETS)
    assert results["base_model"]["config"]["arch"] == "llama"
    assert results["base_model"]["config"]["model_type"] == "llama"
    assert results["base_model"]["params"] == V * C + L * (C * C + 2 * C * (C // 2) + C * C + 3 * C * F + 2 * C) + C
    budget = r * L * (2 * C + 1.5 * C + 1.5 * C + 2 * C + 3 * (C + F))
    assert results["budget"]["target"] == budget
    assert [m["method"] for m in results["methods"]] == METHODS and results["unavailable"] == []
    for m in results["methods"]:
        assert abs(m["trainable_params"] - budget) <= 0.05 * budget, m["method"]
        assert sorted(m["settings"]["target_modules"]) == sorted(LLAMA_TARGETS), m["method"]
        assert len(m["train_curve"]["loss"]) == QUICK["steps"]
    assert "base model: Llama, 2 layers, d_model 32, 2 query heads sharing 1 key/value head" in stdout
    for name in METHODS:  # the table has a row per method
        assert any(line.startswith(name + " ") for line in stdout.splitlines()), name

    # the cached base: a Llama folder, holding a LlamaForCausalLM with grouped-query attention
    folders = os.listdir(cache)
    assert len(folders) == 1 and folders[0].startswith("base-llama-")
    assert results["base_model"]["pretrain"]["cache_path"] == str(cache / folders[0])
    with open(cache / folders[0] / "config.json") as f:
        assert json.load(f)["model_type"] == "llama"
    base = load_pretrained(str(cache / folders[0]), get_backend("cpu", "float32"))
    assert type(base) is LlamaForCausalLM
    assert (base.config.num_attention_heads, base.config.num_key_value_heads) == (2, 1)  # GQA: Hkv < H
    assert (base.config.hidden_size, base.config.intermediate_size, base.config.num_hidden_layers) == (C, F, L)
    assert base.config.tie_word_embeddings is True
    assert base.config.rope_parameters["rope_theta"] == 10000.0
    assert base.max_positions == QUICK["n_positions"]


def test_gpt2_and_llama_bases_never_share_a_folder(llama_run, capsys):
    out, cache, argv = llama_run
    gpt2_argv = [a for a in argv if a not in ("--arch", "llama")]
    gpt2_argv[gpt2_argv.index("--methods") + 1] = "lora"
    assert cli.main(gpt2_argv) == 0
    stdout = capsys.readouterr().out
    assert "base model: GPT-2, 2 layers" in stdout and "base model: cached at" not in stdout
    results = load_results(str(out / "latest"))
    assert results["config"]["arch"] == "gpt2" and results["base_model"]["config"]["model_type"] == "gpt2"
    assert sorted(d.split("-")[1] for d in os.listdir(cache)) == ["gpt2", "llama"]
    assert cli.main(argv) == 0  # the Llama base is still its own, and cached
    assert "base model: cached at " + str(cache / "base-llama-") in capsys.readouterr().out


def test_default_arch_is_gpt2_with_gpt2_targets():
    args = cli.build_parser().parse_args(["run"])
    cfg = config_from_args(args)
    assert (cfg.arch, cfg.target_modules) == ("gpt2", "c_attn,c_proj,c_fc")
    assert RunConfig().target_list() == ["c_attn", "c_proj", "c_fc"]


def test_target_modules_follow_the_arch_unless_given(tmp_path):
    parse = cli.build_parser().parse_args
    assert config_from_args(parse(["run", "--arch", "llama"])).target_list() == LLAMA_TARGETS
    assert config_from_args(parse(["run", "--arch", "llama", "--target_modules", "q_proj,v_proj"])).target_list() \
        == ["q_proj", "v_proj"]
    assert config_from_args(parse(["run", "--target_modules", "auto"])).target_modules == "c_attn,c_proj,c_fc"
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"arch": "llama", "r": 4}))
    assert config_from_args(parse(["run", "--config", str(cfg_file)])).target_list() == LLAMA_TARGETS
