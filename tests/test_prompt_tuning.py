"""Prompt tuning (adapters/prefix.py) on GPT-2 and the LLaMA family, in float64.

1. Parity with transformers + PEFT 0.21.2: PEFT builds the prompt (random), writes its files;
   `reference --adapter` gives PEFT's logits over all P + T positions (the virtual ones included, as
   PEFT's forward returns them), the loss (labels -100 on the virtual positions) and
   grad.prompt_embeddings, <= 1e-10, on padded batches; the engine-written file reads in PEFT.
2. Central differences of the loss in the prompt embeddings.
3. Init: TEXT from token ids (repeated or cut to P, as PEFT), SAMPLE_VOCAB rows of the vocabulary.
4. Budgets (P·C) and bad input (num_virtual_tokens <= 0, a prompt that leaves no position, TEXT
   without ids, a wrong file tensor).
"""
import numpy as np
import pytest

from spectral_peft.adapters.peft_model import get_peft_model, load_peft_model
from spectral_peft.adapters.prefix import PromptTuningConfig
from spectral_peft.backend import get_backend
from spectral_peft.io.safe import FileFormatError, save_safetensors
from spectral_peft.model import load_pretrained
from spectral_peft.oracle import reference
from spectral_peft.testing import assert_close, numerical_gradient

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
peft = pytest.importorskip("peft", reason="peft: the PEFT peer these comparisons run against")
from test_prefix_tuning import (GPT2_V, batch, gpt2, peer_loss, peft_loaded, peft_model, small, small_batch,  # noqa: E402
                                write_model)

P = 3


def with_virtual(data, P):
    """PEFT's labels and mask over the P + T positions: -100 and 1 on the virtual ones."""
    B = data["input_ids"].shape[0]
    labels = np.concatenate([np.full((B, P), -100), data["labels"]], axis=1)
    mask = np.concatenate([np.ones((B, P), dtype=np.int64), data["attention_mask"]], axis=1)
    return labels, mask.astype(bool)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_reference_on_a_peft_prompt_equals_torch_peft(tmp_path, kind):
    mdir = write_model(tmp_path, kind)
    pm = peft_model(kind, mdir, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    adir = tmp_path / "adapter"
    pm.save_pretrained(str(adir))
    data = batch(kind)
    res = reference(mdir, data, adir)
    pt = peft_loaded(kind, mdir, adir)
    labels, real = with_virtual(data, P)
    out, loss = peer_loss(pt, data, labels)
    loss.backward()
    B, T = data["input_ids"].shape
    assert res["logits"].shape == tuple(out.logits.shape) == (B, P + T, res["logits"].shape[-1])
    assert_close(res["logits"][real], out.logits.detach().numpy()[real], "logits", 1e-10)
    assert_close(res["loss"], np.array(loss.item()), "loss", 1e-10)
    expected = pt.prompt_encoder.default.embedding.weight.grad.numpy()
    assert sorted(k for k in res if k.startswith("grad.")) == ["grad.prompt_embeddings"]
    assert np.abs(expected).max() > 0
    assert_close(res["grad.prompt_embeddings"], expected, "grad.prompt_embeddings", 1e-10)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_an_engine_written_prompt_reads_in_peft_to_the_same_logits(tmp_path, kind):
    mdir = write_model(tmp_path, kind)
    ours = get_peft_model(load_pretrained(mdir, get_backend("cpu", "float64")),
                          PromptTuningConfig(num_virtual_tokens=P), seed=3).eval()
    adir = tmp_path / "adapter"
    ours.save_pretrained(adir)
    data = batch(kind, seed=1)
    labels, real = with_virtual(data, P)
    t_out, _ = peer_loss(peft_loaded(kind, mdir, adir), data, labels)
    assert_close(ours.forward(**data).logits[real], t_out.logits.detach().numpy()[real], "logits", 1e-10)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_central_differences_of_the_loss_in_the_prompt(kind):
    pm = get_peft_model(small(kind), PromptTuningConfig(num_virtual_tokens=2), seed=1).eval()
    data = small_batch(kind)
    pm.forward(**data)
    pm.zero_grad()
    pm.backward()
    (name, g), = pm.named_grads().items()
    assert name == "prompt_encoder.embedding.weight"
    x = pm.prompt_encoder.embedding.params["weight"]
    num = numerical_gradient(lambda: pm.forward(**data).loss, x)
    assert np.abs(num).max() > 0
    assert_close(g, num, "dprompt", 1e-6, atol=1e-6 * np.abs(num).max() + 1e-9)


def test_virtual_positions_carry_no_loss_and_the_logits_cover_them():
    """Labels -100 on the virtual positions: the loss equals the mean over the tokens' own targets
    of the logits at positions P-1+t, computed here from the returned logits."""
    pm = get_peft_model(gpt2(), PromptTuningConfig(num_virtual_tokens=P), seed=4).eval()
    data = batch("gpt2")
    out = pm.forward(**data)
    logits = np.asarray(out.logits)  # (B, P + T, V)
    labels, _ = with_virtual(data, P)
    terms = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = labels[b, t + 1]
            if y != -100:
                z = logits[b, t]
                terms.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[y])
    assert_close(np.array(out.loss), np.array(np.mean(terms)), "loss", 1e-12)


def test_text_and_sample_vocab_inits_take_word_embedding_rows():
    model = gpt2()
    W = model.transformer.wte.params["weight"].copy()
    pm = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                                  prompt_tuning_init_text="hi", init_token_ids=[4, 7]))
    assert_close(pm.prompt_encoder.prompt_embeddings(), W[[4, 7, 4, 7, 4]], "TEXT init (repeated, cut)", 0.0)
    assert pm.peft_config.to_json_dict()["prompt_tuning_init"] == "TEXT"
    pm = get_peft_model(gpt2(), PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="SAMPLE_VOCAB"), seed=3)
    E = pm.prompt_encoder.prompt_embeddings()
    assert all(np.any(np.all(W == row, axis=1)) for row in E), "every row is a word embedding"


def test_trainable_count_equals_the_formula():
    model = small("llama")  # C = 8
    for p in (1, 6):
        pm = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=p))
        assert pm.trainable_parameter_count() == p * 8 == pm.peft_config.parameter_count({})
        for _, m in pm.model.named_modules():
            m.frozen.clear()


@pytest.mark.parametrize("n", [0, -1])
def test_bad_input_is_one_clear_error(tmp_path, n):
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=n)
    with pytest.raises(ValueError, match="prompt_tuning_init = 'TEXT' needs init_token_ids"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match=r"init_token_ids holds 99, outside the model's vocabulary \[0, 29\)"):
        get_peft_model(gpt2(), PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", init_token_ids=[99]))
    with pytest.raises(ValueError, match="prompt_tuning_init = 'WORDS'"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="WORDS")
    with pytest.raises(ValueError, match=r"num_virtual_tokens = 12 leaves no position.*n_positions = 12"):
        get_peft_model(gpt2(n_positions=12), PromptTuningConfig(num_virtual_tokens=12))
    pm = get_peft_model(gpt2(n_positions=12), PromptTuningConfig(num_virtual_tokens=8))
    with pytest.raises(ValueError, match=r"T = 6 exceeds n_positions - 8 virtual tokens = 4"):
        pm.forward(np.ones((1, 6), dtype=np.int64))
    pm.save_pretrained(tmp_path)
    save_safetensors({"prompt_embeddings": np.zeros((8, 15))}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(FileFormatError, match=r"prompt_embeddings.*shape \(8, 15\), expected \(8, 16\)"):
        load_peft_model(gpt2(n_positions=12), tmp_path)
    assert GPT2_V == pm.forward(np.ones((1, 4), dtype=np.int64)).logits.shape[-1]


def test_the_reference_command_writes_logits_over_the_virtual_positions(tmp_path):
    from spectral_peft.cli import main as cli_main
    from spectral_peft.io.safe import load_safetensors

    mdir = write_model(tmp_path, "gpt2")
    pm = get_peft_model(load_pretrained(mdir, get_backend("cpu", "float64")), PromptTuningConfig(num_virtual_tokens=P))
    pm.save_pretrained(tmp_path / "adapter")
    data = batch("gpt2")
    save_safetensors(data, tmp_path / "in.safetensors")
    rc = cli_main(["reference", "--model", str(mdir), "--adapter", str(tmp_path / "adapter"), "--inputs",
                   str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors")])
    assert rc == 0
    res = load_safetensors(tmp_path / "out.safetensors")
    assert sorted(res) == ["grad.prompt_embeddings", "logits", "loss"]
    assert res["logits"].shape == (3, P + 6, GPT2_V) and res["grad.prompt_embeddings"].shape == (P, 16)
    pm.eval()
    out = pm.forward(**data)
    pm.zero_grad()
    pm.backward()
    assert_close(res["logits"], out.logits, "logits", 0.0)
    assert_close(res["grad.prompt_embeddings"], pm.prompt_encoder.embedding.grads["weight"], "grad", 0.0)
