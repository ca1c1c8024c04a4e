"""Prefix tuning (adapters/prefix.py) on GPT-2 and the LLaMA family, in float64.

1. Parity with transformers + PEFT 0.21.2: PEFT builds the prefix (random, non-zero), writes its files;
   `reference --adapter` (spectral_peft.oracle.reference) on them gives the logits, the loss and
   grad.prompt_embeddings of PEFT's model, <= 1e-10 relative to each tensor's scale, on padded batches
   (GPT-2 right-padded, Llama / Qwen2 left-padded, grouped-query heads: the prefix has Hkv heads).
   With prefix_projection, the engine's encoder takes PEFT's MLP weights and every gradient (the
   embedding, both linears) is compared; the other direction: the engine writes, PEFT reads the same
   logits.
2. Central differences of the whole model's loss in the prefix and in every MLP parameter.
3. Budgets: the trainable count equals L·2·Hkv·hd·P, or the MLP's count with the projection.
4. Bad input: num_virtual_tokens <= 0, a prefix that leaves the position table no room, a batch
   (or a generation) longer than the table leaves, a file of another model: one clear error, before
   any work.
5. The main job: a quick `run --methods lora,prefix,prompt` trains both on windows of
   n_positions - P real tokens, below the base's eval loss on those windows.
"""
import numpy as np
import pytest

from spectral_peft.adapters.peft_model import get_peft_model, load_peft_model
from spectral_peft.adapters.prefix import PrefixTuningConfig, PromptTuningConfig
from spectral_peft.backend import get_backend
from spectral_peft.io.safe import FileFormatError
from spectral_peft.model import GPT2Config, GPT2LMHeadModel, load_pretrained, save_pretrained
from spectral_peft.oracle import reference
from spectral_peft.testing import assert_close, numerical_gradient

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer")
peft = pytest.importorskip("peft", reason="peft: the PEFT peer these comparisons run against")
from _llama import causal_lm_loss, float64_peer, peer_forward, peer_model  # noqa: E402
from test_llama import V as LLAMA_V  # noqa: E402
from test_llama import build, padded_batch, tiny  # noqa: E402

transformers.logging.set_verbosity_error()
GPT2_V = 29
P = 3  # num_virtual_tokens


def gpt2(n_positions=12, n_embd=16, n_layer=2, n_head=2, seed=1, initializer_range=0.02):
    cfg = GPT2Config(vocab_size=GPT2_V, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=initializer_range)
    return GPT2LMHeadModel(cfg, get_backend("cpu", "float64"), seed=seed)


def write_model(tmp_path, kind):
    d = tmp_path / "model"
    save_pretrained(gpt2() if kind == "gpt2" else build(tiny(kind), seed=3), d)
    return d


def batch(kind, seed=0):
    """A padded batch: GPT-2 right-padded (lengths 6, 4, 2), the LLaMA family left-padded."""
    if kind == "gpt2":
        rng = np.random.default_rng(seed)
        ids = rng.integers(1, GPT2_V, (3, 6))
        mask = (np.arange(6)[None] < np.array([6, 4, 2])[:, None]).astype(np.int64)
        return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}
    ids, mask, labels = padded_batch(seed, 3, 7, left=True)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def peer(kind, mdir):
    """transformers' model of ``mdir`` in float64 (eager attention, eval)."""
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel.from_pretrained(str(mdir), attn_implementation="eager",
                                                            dtype=torch.float64).eval()
    return peer_model(mdir)


def peft_model(kind, mdir, pcfg, seed=0):
    """PEFT's model with a float64 prompt encoder (PEFT builds it in torch's default dtype)."""
    torch.manual_seed(seed)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with float64_peer():
            pm = peft.get_peft_model(peer(kind, mdir), pcfg)
    finally:
        torch.set_default_dtype(saved)
    return pm.eval()


def peft_loaded(kind, mdir, adir):
    """PEFT's PeftModel.from_pretrained of ``adir`` (inference mode), its prompt encoder float64 and
    trainable so that its gradient exists."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with float64_peer():
            pm = peft.PeftModel.from_pretrained(peer(kind, mdir), str(adir))
    finally:
        torch.set_default_dtype(saved)
    for p in pm.prompt_encoder.parameters():
        p.requires_grad_(True)
    return pm.eval()


def peer_loss(pm, data, labels=None):
    out = peer_forward(pm, input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    with float64_peer():
        loss = causal_lm_loss(out.logits, data["labels"] if labels is None else labels)
    return out, loss


KINDS = ["gpt2", "llama", "qwen2"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_reference_on_a_peft_prefix_equals_torch_peft(tmp_path, kind, projection):
    mdir = write_model(tmp_path, kind)
    pm = peft_model(kind, mdir, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                        prefix_projection=projection, encoder_hidden_size=5))
    adir = tmp_path / "adapter"
    pm.save_pretrained(str(adir))
    data = batch(kind)
    res = reference(mdir, data, adir)
    pt = peft_loaded(kind, mdir, adir)
    out, loss = peer_loss(pt, data)
    loss.backward()
    real = data["attention_mask"].astype(bool)
    assert res["logits"].shape == tuple(out.logits.shape)
    assert_close(res["logits"][real], out.logits.detach().numpy()[real], "logits", 1e-10)
    assert_close(res["loss"], np.array(loss.item()), "loss", 1e-10)
    expected = pt.prompt_encoder.default.embedding.weight.grad.numpy()
    assert sorted(k for k in res if k.startswith("grad.")) == ["grad.prompt_embeddings"]
    assert np.abs(expected).max() > 0
    assert_close(res["grad.prompt_embeddings"], expected, "grad.prompt_embeddings", 1e-10)


def engine_with_peft_weights(kind, mdir, pm):
    """The engine's PrefixTuningConfig(prefix_projection=True) model holding PEFT's MLP and embedding."""
    ours = get_peft_model(load_pretrained(mdir, get_backend("cpu", "float64")),
                          PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=5))
    enc = pm.prompt_encoder.default
    pairs = {"embedding.weight": enc.embedding.weight, "transform.0.weight": enc.transform[0].weight,
             "transform.0.bias": enc.transform[0].bias, "transform.2.weight": enc.transform[2].weight,
             "transform.2.bias": enc.transform[2].bias}
    for name, t in pairs.items():
        mod, _, key = f"prompt_encoder.{name}".rpartition(".")
        ours.get_submodule(mod).params[key][...] = t.detach().numpy()
    return ours.eval(), pairs


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_projection_mlp_gradients_equal_torch_peft(tmp_path, kind):
    """Training mode (the MLP present): the gradient of every encoder parameter equals autograd's."""
    mdir = write_model(tmp_path, kind)
    pm = peft_model(kind, mdir, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                        prefix_projection=True, encoder_hidden_size=5))
    ours, pairs = engine_with_peft_weights(kind, mdir, pm)
    data = batch(kind, seed=1)
    out = ours.forward(**data)
    ours.zero_grad()
    ours.backward()
    t_out, loss = peer_loss(pm, data)
    loss.backward()
    real = data["attention_mask"].astype(bool)
    assert_close(out.logits[real], t_out.logits.detach().numpy()[real], "logits", 1e-10)
    assert_close(np.array(out.loss), np.array(loss.item()), "loss", 1e-10)
    grads = ours.named_grads()
    assert set(grads) == {f"prompt_encoder.{n}" for n in pairs}
    for name, t in pairs.items():
        assert np.abs(t.grad.numpy()).max() > 0, name
        assert_close(grads[f"prompt_encoder.{name}"], t.grad.numpy(), name, 1e-10)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_an_engine_written_prefix_reads_in_peft_to_the_same_logits(tmp_path, kind):
    mdir = write_model(tmp_path, kind)
    ours = get_peft_model(load_pretrained(mdir, get_backend("cpu", "float64")),
                          PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=4),
                          seed=2).eval()
    adir = tmp_path / "adapter"
    ours.save_pretrained(adir)
    data = batch(kind, seed=2)
    pt = peft_loaded(kind, mdir, adir)
    t_out, _ = peer_loss(pt, data)
    real = data["attention_mask"].astype(bool)
    assert_close(ours.forward(**data).logits[real], t_out.logits.detach().numpy()[real], "logits", 1e-10)
    assert pt.peft_config["default"].prefix_projection is True  # PEFT reads Z as the embedding (inference mode)


# --- central differences --------------------------------------------------------------------------
def small(kind):
    if kind == "gpt2":
        return gpt2(n_positions=10, n_embd=8, n_layer=2, n_head=2, seed=4)
    return build(tiny("llama", H=2, Hkv=1, hidden_size=8, intermediate_size=12), seed=5)


def small_batch(kind):
    rng = np.random.default_rng(6)
    V = GPT2_V if kind == "gpt2" else LLAMA_V
    ids = rng.integers(1, V, (2, 4))
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]] if kind == "gpt2" else [[1, 1, 1, 1], [0, 0, 1, 1]])
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("projection", [False, True], ids=["prefix", "projection_mlp"])
def test_central_differences_of_the_loss(kind, projection):
    pm = get_peft_model(small(kind), PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=projection,
                                                        encoder_hidden_size=3), seed=7).eval()
    data = small_batch(kind)
    pm.forward(**data)
    pm.zero_grad()
    pm.backward()
    grads = pm.named_grads()
    params = {name: m.params[k] for name, m, k in pm.named_parameters(trainable_only=True)}
    assert len(params) == (5 if projection else 1)
    for name, x in params.items():
        num = numerical_gradient(lambda: pm.forward(**data).loss, x)
        assert np.abs(num).max() > 0, name
        assert_close(grads[name], num, name, 1e-6, atol=1e-6 * np.abs(num).max() + 1e-9)


# --- budgets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_trainable_counts_equal_the_formulas(kind):
    model = small(kind) if kind == "gpt2" else build(tiny("llama", H=4, Hkv=2, hd=6), seed=1)
    c = model.config
    L, Hkv, hd = (c.n_layer, c.n_head, c.n_embd // c.n_head) if kind == "gpt2" else \
        (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    for p in (1, 4):
        pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=p))
        assert pm.trainable_parameter_count() == L * 2 * Hkv * hd * p == pm.peft_config.parameter_count({})
        assert pm.prompt_encoder.prefixes()[0][0].shape == (Hkv, p, hd)  # grouped-query: Hkv heads
        model = pm.model
        for _, m in model.named_modules():
            m.frozen.clear()
    td, E, p = Hkv * hd, 5, 3
    pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=p, prefix_projection=True, encoder_hidden_size=E))
    formula = p * td + (td * E + E) + (E * 2 * L * td + 2 * L * td)
    assert pm.trainable_parameter_count() == formula == pm.peft_config.parameter_count({})


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [PrefixTuningConfig(num_virtual_tokens=2), PromptTuningConfig(num_virtual_tokens=2)])
def test_merging_a_virtual_token_adapter_is_refused(config):
    """merge_and_unload would otherwise return the bare base, silently dropping the virtual tokens."""
    from spectral_peft.adapters.peft_model import merge_and_unload

    pm = get_peft_model(small("gpt2"), config)
    with pytest.raises(TypeError, match="virtual tokens, not weight deltas; there is nothing to merge"):
        merge_and_unload(pm)
    assert pm.prompt_encoder is not None


@pytest.mark.parametrize("n", [0, -2, 1.5])
def test_num_virtual_tokens_must_be_a_positive_int(n):
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuningConfig(num_virtual_tokens=n)


def test_a_prefix_longer_than_the_position_table_is_refused():
    model = gpt2(n_positions=8)
    with pytest.raises(ValueError, match=r"num_virtual_tokens = 8 leaves no position for a token: the model's "
                                         r"n_positions = 8.*num_virtual_tokens <= 7"):
        get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=8))
    assert not model.frozen and not model.transformer.wte.frozen  # refused before anything changed
    pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=5))
    ids = np.ones((1, 4), dtype=np.int64)
    with pytest.raises(ValueError, match=r"sequence length T = 4 exceeds n_positions - 5 virtual tokens = 3"):
        pm.forward(ids)
    assert pm.forward(ids[:, :3]).logits.shape == (1, 3, GPT2_V)
    # generation: the virtual tokens, the prompt and the new tokens together must fit the table
    with pytest.raises(ValueError, match=r"max_new_tokens: 5 virtual tokens \+ the prompt's 2 tokens \+ 2 new ones "
                                         r"exceed the model's 8 positions"):
        pm.generate(ids[:, :2], max_new_tokens=2)
    assert pm.generate(ids[:, :2], max_new_tokens=1).sequences.shape == (1, 3)


def test_a_file_of_another_model_is_refused_naming_the_field(tmp_path):
    pm = get_peft_model(gpt2(n_layer=2), PrefixTuningConfig(num_virtual_tokens=2))
    pm.save_pretrained(tmp_path)
    other = gpt2(n_layer=3)
    with pytest.raises(FileFormatError, match=r"num_layers = 2 does not fit the model, which needs 3"):
        load_peft_model(other, tmp_path)
    assert not other.transformer.wte.frozen
    again = load_peft_model(gpt2(n_layer=2), tmp_path)
    assert_close(again.prompt_encoder.prompt_embeddings(), pm.prompt_encoder.prompt_embeddings(), "reloaded", 0.0)


# --- the main job's recipes -----------------------------------------------------------------------
def test_the_recipes_match_a_budget_by_num_virtual_tokens_capped_to_leave_half_the_positions_real():
    from spectral_peft.adapters.registry import METHODS, recipe
    from spectral_peft.budget import match_budget
    from spectral_peft.commands.run import precheck_methods
    from spectral_peft.commands.run_options import DEFAULT_METHODS, RunConfig

    assert {"prefix", "prompt"} <= set(METHODS) and not {"prefix", "prompt"} & set(DEFAULT_METHODS)
    for arch, Hkv in (("gpt2", 4), ("llama", 2)):
        opts = RunConfig(arch=arch, n_layer=4, n_embd=128, n_head=4, n_positions=64, methods="prefix,prompt")
        precheck_methods(opts)  # builds each config once: no error
        per_token = 4 * 2 * Hkv * 32  # L·2·Hkv·hd
        size, count = match_budget(recipe("prefix"), opts, {}, 64 * per_token, 0.05)
        assert (size, count) == (64, 64 * per_token)
        size, count = match_budget(recipe("prompt"), opts, {}, 128 * 300, 0.05)
        assert (size, count) == (300, 300 * 128)  # P·C
        for name in ("prefix", "prompt"):
            conf = recipe(name).make_config(opts, 20)
            assert conf.run_max_virtual_tokens(opts) == 32  # at least 64 / 2 positions stay real tokens
            assert conf.run_window(opts) == 64 - 20  # real tokens per window
            assert recipe(name).lr_option == "prompt_lr"


def test_run_trains_prefix_and_prompt_tuning_on_shorter_windows(tmp_path, capsys):
    """`spectral-peft run --quick --methods lora,prefix,prompt` (64 positions): both train on windows
    of 64 - P real tokens. Expected sizes from the formulas: budget = LoRA r=4 on GPT-2's four
    linears = r·16C·L = 4096; prefix 2L·Hkv·hd = 128 per token -> P = 32 (the cap, 64 / 2), at the
    budget; prompt C = 32 per token -> 128 wanted, capped at 32: 1024 trainable."""
    import json
    import math

    from spectral_peft.cli import main

    out = tmp_path / "runs"
    argv = ["run", "--quick", "--methods", "lora,prefix,prompt", "--n_positions", "64", "--pretrain_steps", "200",
            "--steps", "60", "--eval_batches", "4", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--progress", "false", "--figures", "false"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    with open(out / "latest" / "results.json") as f:
        results = json.load(f)
    assert results["unavailable"] == [] and results["budget"]["target"] == 4096
    by = {m["method"]: m for m in results["methods"]}
    assert list(by) == ["lora", "prefix", "prompt"]
    for m in by.values():
        assert all(math.isfinite(v) for v in m["train_curve"]["loss"] + m["eval_curve"]["loss"]), m["method"]
        assert len(m["train_curve"]["loss"]) == 60
    for name, count, capped in (("prefix", 4096, None), ("prompt", 1024, "capped from the budget's 128")):
        m = by[name]
        w = m["extras"]["window"]
        assert (m["trainable_params"], m["settings"]["num_virtual_tokens"]) == (count, 32), name
        assert {k: w[k] for k in ("real_tokens", "virtual_tokens", "n_positions", "eval_windows")} == \
            {"real_tokens": 32, "virtual_tokens": 32, "n_positions": 64, "eval_windows": 16}, name  # 4 batches of 4
        assert (w["capped"] is None) if capped is None else (capped in w["capped"]), name
        # below the base's eval loss on the same windows, and below where the method started
        assert m["final_eval_loss"] < w["base_eval_loss"], (name, m["final_eval_loss"], w["base_eval_loss"])
        assert m["final_eval_loss"] < m["eval_curve"]["loss"][0], name
        assert f"method {name}: trained and evaluated on windows of 32 real tokens after 32 virtual ones" in stdout
    assert by["prompt"]["extras"]["window"]["base_eval_loss"] == by["prefix"]["extras"]["window"]["base_eval_loss"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("config", [PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=6),
                                    PromptTuningConfig(num_virtual_tokens=2)], ids=["prefix", "prompt"])
def test_training_lowers_the_loss_and_the_saved_adapter_reloads(tmp_path, kind, config):
    from spectral_peft.optim import make_adamw
    from spectral_peft.train import SeededBatches, Trainer

    V = GPT2_V if kind == "gpt2" else LLAMA_V
    # GPT-2 at HF's init (std 0.02) is nearly uniform and barely hears a prefix: a base of std 0.3
    base = gpt2(n_positions=12, seed=2, initializer_range=0.3) if kind == "gpt2" else build(tiny("llama"), seed=2)
    pm = get_peft_model(base, config, seed=1)
    tokens = (np.arange(400) * 3 + np.arange(400) // 5) % V  # a learnable sequence
    evals = [next(iter(SeededBatches(tokens[300:], 4, 8, seed=9)))]
    trainer = Trainer(pm, *make_adamw(pm, 3e-2, 0.0, 30))
    before = trainer.evaluate(evals)
    trainer.fit(SeededBatches(tokens[:300], 4, 8, seed=1), 30)
    after = trainer.evaluate(evals)
    assert after < before, f"eval loss {before:.4f} -> {after:.4f}"
    pm.eval()
    ids = np.arange(12).reshape(2, 6) % V
    logits = np.array(pm.forward(ids).logits)
    pm.save_pretrained(tmp_path)
    fresh = gpt2(n_positions=12, seed=2, initializer_range=0.3) if kind == "gpt2" else build(tiny("llama"), seed=2)
    assert_close(load_peft_model(fresh, tmp_path).eval().forward(ids).logits, logits, "reloaded logits", 1e-12)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_given_position_ids_are_offset_by_the_prefix_as_peft_does(kind):
    """PEFT adds num_virtual_tokens to given position_ids: arange(T) then means P..P+T-1, the default
    positions after a prefix; without the offset the logits would differ."""
    pm = get_peft_model(small(kind), PrefixTuningConfig(num_virtual_tokens=2), seed=3).eval()
    data = small_batch(kind)
    ids = data["input_ids"]
    default = np.array(pm.forward(ids).logits)
    given = pm.forward(ids, position_ids=np.broadcast_to(np.arange(ids.shape[1]), ids.shape)).logits
    assert_close(given, default, "logits with position_ids arange(T)", 1e-13)
    shifted = pm.forward(ids, position_ids=np.broadcast_to(np.arange(1, ids.shape[1] + 1), ids.shape)).logits
    assert np.abs(np.asarray(shifted) - default).max() > 1e-6
