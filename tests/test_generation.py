"""KV-cache generation (spectral_peft/generation.py, `spectral-peft generate`).

1. Greedy sequences identical to transformers' ``generate`` in float64 and the per-step logits
   equal (<= 1e-10 scale-relative), left padding included, on GPT-2, Llama, Mistral (a sliding
   window shorter than the sequence) and Qwen2; with a PEFT LoRA adapter computed at every step
   and merged into the base, against PEFT's model; prefix and prompt tuning against PEFT's generate
   (GPT-2, Llama); with an eos token against transformers' stop.
2. Incremental decoding equals a full forward over the whole sequence at every step (float64,
   <= 1e-12 scale-relative): a Hypothesis property over models, batches and paddings.
3. Sampling: the warped distribution equals transformers' temperature, top-k and top-p warpers;
   draws follow the distribution and never pick a removed token; top_k = 1 is greedy.
4. The cache is preallocated once and its bytes reported; every bad input is refused before any
   work (API: ValueError naming it; command: exit 2, one line, no output file).
"""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.adapters.peft_model import load_peft_model, merge_and_unload
from spectral_peft.backend import get_backend
from spectral_peft.cli import main as cli_main
from spectral_peft.generation import generate, position_ids_from_mask, sample, warp_logits
from spectral_peft.io.safe import load_safetensors, save_safetensors
from spectral_peft.model import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, KVCache, load_pretrained,
                                 save_pretrained)
from spectral_peft.testing import assert_close

torch = pytest.importorskip("torch", reason="torch: the peer these comparisons run against")
transformers = pytest.importorskip("transformers", reason="transformers: the generate peer")
from _llama import float64_peer, peer_model  # noqa: E402
from test_llama import build, tiny  # noqa: E402

V = 41  # test_llama's vocabulary
BE64 = get_backend("cpu", "float64")
FAMILIES = ["gpt2", "llama", "mistral", "qwen2"]


def engine_model(family, seed=3):
    """A float64 model with weights large enough that greedy decoding does not settle on one token."""
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=24, n_embd=12, n_layer=2, n_head=3,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           initializer_range=0.4), BE64, seed=seed)
        rng = np.random.default_rng(seed)
        for _, m, k in model.named_parameters():
            if k == "bias":
                m.params[k][:] = 0.3 * rng.standard_normal(m.params[k].shape)
        return model
    kw = {"mistral": dict(sliding_window=4), "qwen2": dict(use_sliding_window=False)}.get(family, {})
    return build(tiny(family, H=4, Hkv=2, initializer_range=0.3, **kw), seed=seed)


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    save_pretrained(engine_model(request.param), d)
    return request.param, d


def left_padded(seed, B=3, T=6):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    lengths = np.r_[T, rng.integers(1, T + 1, B - 1)]
    mask = (np.arange(T)[None, :] >= T - lengths[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, 0), mask


def peer_generate(tm, ids, mask, n, **kw):
    """transformers' generate, float64 throughout (tests/_llama.py), greedy unless told: (sequences, logits)."""
    gc = tm.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = None, kw.pop("eos_token_id", None), kw.pop("pad_token_id", 0)
    with float64_peer():
        g = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                        do_sample=False, output_logits=True, return_dict_in_generate=True, **kw)
    return g.sequences.numpy(), torch.stack(g.logits, dim=1).numpy()


def assert_same_tokens(got, expected, what):
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    bad = np.argwhere(got != expected)
    assert bad.size == 0, f"{what}: {len(bad)} tokens differ, first at (row, position) {tuple(bad[0])}"


# ------------------------------------------------------------------------------------------------
# 1. against transformers and PEFT
# ------------------------------------------------------------------------------------------------
def test_greedy_equals_transformers_generate(saved):
    family, d = saved
    ids, mask = left_padded(0)
    ours = generate(load_pretrained(d, BE64), ids, mask, max_new_tokens=12)
    seq, logits = peer_generate(peer_model(d), ids, mask, 12)
    assert_same_tokens(ours.sequences, seq, f"{family} sequences")
    assert_close(ours.logits, logits, f"{family} per-step logits", 1e-10)
    assert len(np.unique(ours.sequences[:, 6:])) > 2, "degenerate model: greedy output barely varies"


def _peft_adapter(family, d, tmp_path):
    """A PEFT LoRA adapter with non-zero B (init_lora_weights=False), written by PEFT."""
    peft = pytest.importorskip("peft", reason="peft: the adapter peer")
    targets = ["c_attn", "c_proj"] if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(1)
    with float64_peer():
        pm = peft.get_peft_model(peer_model(d), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                                init_lora_weights=False,
                                                                fan_in_fan_out=family == "gpt2"))
    adir = tmp_path / "adapter"
    pm.save_pretrained(str(adir))
    return pm.eval(), adir


def test_adapter_unmerged_and_merged_equal_peft_generate(saved, tmp_path):
    family, d = saved
    pm, adir = _peft_adapter(family, d, tmp_path)
    ids, mask = left_padded(1)
    seq, logits = peer_generate(pm, ids, mask, 10)
    unmerged = generate(load_peft_model(load_pretrained(d, BE64), adir), ids, mask, max_new_tokens=10)
    merged = generate(merge_and_unload(load_peft_model(load_pretrained(d, BE64), adir)), ids, mask, max_new_tokens=10)
    assert_same_tokens(unmerged.sequences, seq, f"{family} + LoRA (unmerged) sequences")
    assert_close(unmerged.logits, logits, f"{family} + LoRA (unmerged) logits", 1e-10)
    assert_same_tokens(merged.sequences, seq, f"{family} + LoRA (merged) sequences")
    assert_close(merged.logits, logits, f"{family} + LoRA (merged) logits", 1e-10)
    plain = generate(load_pretrained(d, BE64), ids, mask, max_new_tokens=10)
    assert np.abs(plain.logits - logits).max() > 1e-3, "the adapter changed nothing: the comparison proves nothing"


def peft_cache_name(pm):
    """PEFT 0.21.2's generate for prompt learning (PeftModelForCausalLM.prepare_inputs_for_generation)
    reads and writes the KV cache as model_kwargs["past_key_values"], transformers 5's name for it is
    "cache": unrenamed, the model ignores PEFT's prefix cache (transformers warns "Both
    `past_key_values` and `cache` are set ... ignoring past_key_values") and PEFT, seeing no cache,
    puts the prompt before every step's whole input again. This hands PEFT the cache under its
    name and the model PEFT's cache under transformers' name; PEFT's own logic is unchanged."""
    inner = pm.base_model_prepare_inputs_for_generation
    outer = pm.prepare_inputs_for_generation

    def base_prepare(*args, **kwargs):
        out = inner(*args, **kwargs)
        if "cache" in out:
            out["past_key_values"] = out.pop("cache")
        return out

    def prepare(*args, **kwargs):
        out = outer(*args, **kwargs)
        if "past_key_values" in out:
            out["cache"] = out.pop("past_key_values")
        return out

    pm.base_model_prepare_inputs_for_generation = base_prepare
    pm.prepare_inputs_for_generation = prepare  # PEFT's generate installs it on the base model
    return pm


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_tuning_equal_peft_generate(tmp_path, family, method):
    """PEFT's generate with a prefix (the cache's first P positions, the tokens' positions offset by
    P) or a prompt (before the first forward's embeddings): PEFT builds the adapter (random, N(0, 1)),
    the engine loads its files; left-padded rows, greedy, float64."""
    from test_prefix_tuning import peft_model  # noqa: PLC0415 - PEFT's model with a float64 prompt encoder

    peft = pytest.importorskip("peft", reason="peft: the adapter peer")
    d = tmp_path / "model"
    save_pretrained(engine_model(family), d)
    pcfg = (peft.PrefixTuningConfig if method == "prefix" else peft.PromptTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=4)
    pm = peft_model(family, d, pcfg, seed=2)
    adir = tmp_path / "adapter"
    pm.save_pretrained(str(adir))
    ids, mask = left_padded(4)
    seq, logits = peer_generate(peft_cache_name(pm), ids, mask, 8)
    ours = generate(load_peft_model(load_pretrained(d, BE64), adir), ids, mask, max_new_tokens=8)
    assert_same_tokens(ours.sequences, seq, f"{family} + {method} tuning sequences")
    assert_close(ours.logits, logits, f"{family} + {method} tuning per-step logits", 1e-10)
    plain = generate(load_pretrained(d, BE64), ids, mask, max_new_tokens=8)
    assert np.abs(plain.logits - logits).max() > 1e-3, f"the {method} changed nothing: the comparison proves nothing"
    assert ours.cache_bytes == plain.cache_bytes * (4 + 6 + 8) // (6 + 8), "the cache holds the 4 virtual positions"


def test_eos_stops_rows_as_transformers_does(saved):
    family, d = saved
    ids, mask = left_padded(2)
    free = generate(load_pretrained(d, BE64), ids, mask, max_new_tokens=10).sequences[:, 6:]
    eos = int(free[0, 2])  # row 0 finishes at step 3 at the latest; the others when they meet it
    ours = generate(load_pretrained(d, BE64), ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=1)
    seq, logits = peer_generate(peer_model(d), ids, mask, 10, eos_token_id=eos, pad_token_id=1)
    assert_same_tokens(ours.sequences, seq, f"{family} sequences with eos {eos}")
    assert_close(ours.logits, logits, f"{family} logits with eos", 1e-10)
    new = ours.sequences[:, 6:]
    for row in new:  # after a row's eos only pads
        hit = np.flatnonzero(row == eos)
        if hit.size:
            assert (row[hit[0] + 1:] == 1).all(), f"tokens after eos: {row}"


# ------------------------------------------------------------------------------------------------
# 2. incremental == full forward
# ------------------------------------------------------------------------------------------------
MODELS = {f: engine_model(f) for f in FAMILIES}


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(FAMILIES), B=st.integers(1, 3), T=st.integers(1, 6), N=st.integers(1, 7),
       seed=st.integers(0, 2**16))
def test_incremental_decoding_equals_full_forward(family, B, T, N, seed):
    model = MODELS[family]
    ids, mask = left_padded(seed, B, T)
    out = generate(model, ids, mask, max_new_tokens=N)
    for i in range(N):
        seq = out.sequences[:, :T + i]
        full_mask = np.concatenate([mask, np.ones((B, i), np.int64)], axis=1)
        full = model.forward(seq, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask == 1))
        assert_close(out.logits[:, i], full.logits[:, -1], f"{family} step {i} logits (cache vs full)", 1e-12)


def test_a_4bit_base_with_lora_generates_unmerged_and_refuses_to_merge():
    """QLoRA: the frozen NF4 base with a LoRA on top decodes with the cache exactly as a full forward
    does; merging into the 4-bit base is refused (it would requantise W + ΔW)."""
    from spectral_peft.adapters.lora import LoraConfig
    from spectral_peft.adapters.peft_model import get_peft_model
    from spectral_peft.quant import quantize_model

    model = engine_model("llama", seed=5)
    quantize_model(model, quant_type="nf4", blocksize=32)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), seed=1)
    rng = np.random.default_rng(0)
    for _, layer in pm.adapter_layers():
        layer.params["lora_B.weight"][...] = rng.standard_normal(layer.params["lora_B.weight"].shape)
    ids, mask = left_padded(9)
    out = generate(pm, ids, mask, max_new_tokens=5)
    for i in range(5):
        full_mask = np.concatenate([mask, np.ones((3, i), np.int64)], axis=1)
        full = pm.forward(out.sequences[:, :6 + i], attention_mask=full_mask,
                          position_ids=position_ids_from_mask(full_mask == 1))
        assert_close(out.logits[:, i], full.logits[:, -1], f"QLoRA step {i} logits (cache vs full)", 1e-12)
    with pytest.raises(TypeError, match="cannot merge into a Linear4bit base"):
        merge_and_unload(pm)


def test_position_ids_follow_the_mask():
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(position_ids_from_mask(mask), [[1, 1, 0, 1], [0, 1, 2, 3], [1, 1, 1, 0]])


# ------------------------------------------------------------------------------------------------
# 3. sampling
# ------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), temperature=st.sampled_from([0.5, 1.0, 1.7]),
       top_k=st.sampled_from([None, 1, 3, 10]), top_p=st.sampled_from([None, 0.3, 0.9, 1.0]))
def test_warping_equals_transformers_warpers(seed, temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    logits = np.random.default_rng(seed).normal(size=(4, 17)) * 3
    procs = LogitsProcessorList(([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
                                + ([TopKLogitsWarper(top_k)] if top_k else [])
                                + ([TopPLogitsWarper(top_p)] if top_p is not None and top_p < 1 else []))
    expected = procs(None, torch.tensor(logits)).numpy()
    got = warp_logits(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected), err_msg="the removed tokens differ")
    keep = ~np.isinf(expected)
    assert_close(got[keep], expected[keep], "warped scores", 1e-14)


def test_draws_follow_the_distribution_and_skip_removed_tokens():
    with np.errstate(divide="ignore"):
        scores = np.log(np.array([[0.5, 0.0, 0.2, 0.3, 0.0]]))  # two removed tokens (-inf)
    rng = np.random.default_rng(0)
    draws = np.array([sample(scores, rng)[0] for _ in range(20000)])
    freq = np.bincount(draws, minlength=5) / draws.size
    assert freq[1] == 0 and freq[4] == 0, f"a removed token was drawn: {freq}"
    p = np.array([0.5, 0, 0.2, 0.3, 0])
    sigma = np.sqrt(p * (1 - p) / draws.size)
    assert (np.abs(freq - p) <= 5 * sigma + 1e-12).all(), f"frequencies {freq} vs probabilities {p}"


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = MODELS["llama"]
    ids, mask = left_padded(3)
    greedy = generate(model, ids, mask, max_new_tokens=8)
    k1 = generate(model, ids, mask, max_new_tokens=8, do_sample=True, top_k=1, seed=5)
    assert_same_tokens(k1.sequences, greedy.sequences, "top_k = 1 vs greedy")
    a = generate(model, ids, mask, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    b = generate(model, ids, mask, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    assert_same_tokens(a.sequences, b.sequences, "same seed, same draws")
    others = [generate(model, ids, mask, max_new_tokens=8, do_sample=True, temperature=1.5, seed=s).sequences
              for s in range(8, 12)]
    assert any((o != a.sequences).any() for o in others), "sampling never departs from one sequence"


# ------------------------------------------------------------------------------------------------
# 4. the cache and bad input
# ------------------------------------------------------------------------------------------------
def test_cache_is_preallocated_once_and_its_bytes_reported(monkeypatch):
    made = []
    orig = KVCache.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(KVCache, "__init__", spy)
    model = MODELS["llama"]  # 2 layers, Hkv = 2 (not H = 4), hd = 4
    ids, mask = left_padded(4, B=2, T=5)
    out = generate(model, ids, mask, max_new_tokens=7)
    assert len(made) == 1, f"{len(made)} caches made for one generation"
    cache = made[0]
    buffers = [id(a) for a in cache.keys + cache.values]
    assert out.cache_bytes == 2 * 2 * 2 * 2 * (5 + 7) * 4 * 8 == cache.nbytes
    assert [id(a) for a in cache.keys + cache.values] == buffers and cache.length == 5 + 6


BAD = [
    (dict(attention_mask=np.array([[1, 1, 0], [1, 1, 1]])), "padding after a real token.*left padding"),
    (dict(attention_mask=np.array([[0, 0, 0], [1, 1, 1]])), "row 0 has no real token"),
    (dict(attention_mask=np.array([[1, 2, 1], [1, 1, 1]])), "only 0 .* and 1"),
    (dict(input_ids=np.array([[1, 2, V], [1, 2, 3]])), f"token id {V} .* outside"),
    (dict(max_new_tokens=22), "3 tokens \\+ 22 new ones exceed the model's 24 positions"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=0.7), "temperature only applies when sampling"),
    (dict(do_sample=True, temperature=0.0), "temperature must be a number > 0"),
    (dict(do_sample=True, top_p=0.0), "top_p must be a number in \\(0, 1\\]"),
    (dict(do_sample=True, top_k=0), "top_k must be an integer >= 1"),
    (dict(eos_token_id=V), "eos_token_id"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_refused_before_any_work(monkeypatch, change, message):
    model = engine_model("llama")
    monkeypatch.setattr(type(model), "new_kv_cache", lambda *a, **k: pytest.fail("work began"))
    kw = dict(input_ids=np.array([[1, 2, 3], [4, 5, 6]]), attention_mask=None, max_new_tokens=4)
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        generate(model, kw.pop("input_ids"), kw.pop("attention_mask"), **kw)


def test_a_model_without_a_causal_head_is_refused():
    bert = BertModel(BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8), BE64)
    with pytest.raises(TypeError, match="generate needs a causal LM.*got BertModel"):
        generate(bert, np.array([[1, 2]]), max_new_tokens=2)


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
def test_command_writes_what_the_api_returns(tmp_path, capsys):
    d = tmp_path / "model"
    save_pretrained(engine_model("qwen2"), d)
    ids, mask = left_padded(5)
    save_safetensors({"input_ids": ids, "attention_mask": mask}, tmp_path / "in.safetensors")
    argv = ["generate", "--model", str(d), "--inputs", str(tmp_path / "in.safetensors"), "--max_new_tokens", "5",
            "--out", str(tmp_path / "out.safetensors")]
    assert cli_main(argv) == 0
    got = load_safetensors(tmp_path / "out.safetensors")
    api = generate(load_pretrained(d, BE64), ids, mask, max_new_tokens=5)
    assert set(got) == {"sequences", "logits"}
    assert got["sequences"].dtype == np.int64 and got["sequences"].shape == (3, 11)
    assert_same_tokens(got["sequences"], api.sequences, "command vs API sequences")
    assert got["logits"].dtype == np.float64 and got["logits"].shape == (3, 5, V)
    np.testing.assert_array_equal(got["logits"], api.logits)
    assert f"KV cache {api.cache_bytes} bytes" in capsys.readouterr().out


def test_command_merged_and_unmerged_adapter_give_the_same_tokens(tmp_path):
    d = tmp_path / "model"
    save_pretrained(engine_model("llama"), d)
    _, adir = _peft_adapter("llama", d, tmp_path)
    ids, mask = left_padded(6)
    save_safetensors({"input_ids": ids, "attention_mask": mask}, tmp_path / "in.safetensors")
    outs = {}
    for merge in (False, True):
        out = tmp_path / f"out-{merge}.safetensors"
        argv = ["generate", "--model", str(d), "--adapter", str(adir), "--inputs", str(tmp_path / "in.safetensors"),
                "--max_new_tokens", "6", "--out", str(out)] + (["--merge"] if merge else [])
        assert cli_main(argv) == 0
        outs[merge] = load_safetensors(out)
    assert_same_tokens(outs[True]["sequences"], outs[False]["sequences"], "merged vs unmerged")
    assert_close(outs[True]["logits"], outs[False]["logits"], "merged vs unmerged logits", 1e-12)


BAD_COMMANDS = [
    ({"input_ids": np.array([[1, 2, 3]])}, ["--max_new_tokens", "30"], "exceed the model's 24 positions"),
    ({"input_ids": np.array([[1, 2, 99]])}, [], "token id 99"),
    ({"input_ids": np.array([[1, 2, 3]]), "labels": np.array([[1, 2, 3]])}, [], "key 'labels' is not an input"),
    ({"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.array([[1, 1, 0]])}, [], "left padding"),
    ({"input_ids": np.array([[1, 2, 3]])}, ["--merge"], "--merge needs --adapter"),
    ({"input_ids": np.array([[1, 2, 3]])}, ["--top_k", "3"], "top_k only applies when sampling"),
    ({"input_ids": np.array([[1.0, 2.0]])}, [], "input_ids.*integer"),
]


@pytest.mark.parametrize("inputs,extra,message", BAD_COMMANDS, ids=[c[2] for c in BAD_COMMANDS])
def test_command_bad_input_exits_2_with_one_line_and_no_output(tmp_path, capsys, inputs, extra, message):
    d = tmp_path / "model"
    save_pretrained(engine_model("gpt2"), d)
    save_safetensors(inputs, tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    argv = ["generate", "--model", str(d), "--inputs", str(tmp_path / "in.safetensors"), "--max_new_tokens", "3",
            "--out", str(out)] + extra
    # a repeated --max_new_tokens in extra overrides the 3 (argparse keeps the last)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spectral-peft generate: error:"), err
    assert re.search(message, err), f"{message!r} not in {err!r}"
    assert not out.exists()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_device_generates_what_the_cpu_generates(tmp_path, backend64, family):
    """gpu-emulated (CuPy's rules on NumPy: no implicit host/device mixing) and the GPU where
    present: the same tokens, logits to rounding."""
    d = tmp_path / family
    save_pretrained(engine_model(family), d)
    ids, mask = left_padded(8)
    cpu = generate(load_pretrained(d, BE64), ids, mask, max_new_tokens=6)
    dev = generate(load_pretrained(d, backend64), ids, mask, max_new_tokens=6)
    assert_same_tokens(dev.sequences, cpu.sequences, f"{backend64.device} sequences")
    assert_close(dev.logits, cpu.logits, f"{backend64.device} logits", 1e-12)
