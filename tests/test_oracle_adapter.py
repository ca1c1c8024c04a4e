"""`spectral-peft reference --adapter DIR`: the gradient of every adapter parameter equals torch + PEFT's,
for a PEFT-written LoRA / DoRA adapter on GPT-2 and BERT, in float64; a bad adapter is one error line,
status 2 and no output file."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer these comparisons run against")
peft = pytest.importorskip("peft", reason="peft: the PEFT peer these comparisons run against")

from spectral_peft.backend import get_backend  # noqa: E402
from spectral_peft.cli import main as cli_main  # noqa: E402
from spectral_peft.io.safe import load_safetensors, save_safetensors  # noqa: E402
from spectral_peft.model import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                                 save_pretrained)
from spectral_peft.testing import assert_close  # noqa: E402

transformers.logging.set_verbosity_error()
V = 19


def write_case(tmp_path, kind, use_dora):
    """A model dir, a PEFT-written adapter dir (random non-zero B) and an inputs file; returns the
    torch PEFT model too."""
    mdir, adir = tmp_path / "model", tmp_path / "adapter"
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                                get_backend("cpu", "float64"), seed=7)
        cls, targets = transformers.GPT2LMHeadModel, ["c_attn", "c_proj", "c_fc"]
    else:
        model = BertForSequenceClassification(
            BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
                       max_position_embeddings=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       num_labels=3), get_backend("cpu", "float64"), seed=8)
        cls, targets = transformers.BertForSequenceClassification, ["query", "value", "dense"]
    save_pretrained(model, mdir)
    tm = cls.from_pretrained(str(mdir), attn_implementation="eager", dtype=torch.float64)
    torch.manual_seed(3)
    pm = peft.get_peft_model(tm, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False,
                                                 use_dora=use_dora)).eval()
    pm.save_pretrained(str(adir))
    rng = np.random.default_rng(4)
    ids = rng.integers(1, V, (2, 6))
    mask = np.array([[1] * 6, [1] * 3 + [0] * 3])
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "gpt2":
        inputs["labels"] = np.where(mask == 1, ids, -100)
    else:
        ids[mask == 0] = 0
        inputs["labels"] = np.array([1, 2])
    save_safetensors(inputs, tmp_path / "in.safetensors")
    return mdir, adir, pm, inputs


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_reference_adapter_gradients_equal_torch_peft(tmp_path, kind, use_dora):
    mdir, adir, pm, inputs = write_case(tmp_path, kind, use_dora)
    out = tmp_path / "out.safetensors"
    rc = cli_main(["reference", "--model", str(mdir), "--adapter", str(adir), "--inputs",
                   str(tmp_path / "in.safetensors"), "--out", str(out)])
    assert rc == 0
    res = load_safetensors(out)
    t_out = pm(input_ids=torch.tensor(inputs["input_ids"]), attention_mask=torch.tensor(inputs["attention_mask"]))
    logits = t_out.logits
    if kind == "gpt2":  # the causal-LM loss in float64 (transformers' own upcasts to float32)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V),
                                                 torch.tensor(inputs["labels"])[:, 1:].reshape(-1), ignore_index=-100)
    else:
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(inputs["labels"]))
    loss.backward()
    assert_close(res["loss"], np.array(loss.item()), "loss", 1e-10)
    expected = {}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            key = n.replace(".default.weight", ".weight").replace("lora_magnitude_vector.weight",
                                                                  "lora_magnitude_vector")
            expected[f"grad.{key}"] = p.grad.numpy()
    got = {k: v for k, v in res.items() if k.startswith("grad.")}
    assert set(got) == set(expected), "one gradient per adapter parameter, under its adapter-file key"
    for k, g in expected.items():
        assert_close(got[k], g, k, 1e-10)


def test_reference_with_a_bad_adapter_fails_cleanly(tmp_path, capsys):
    mdir, adir, _, _ = write_case(tmp_path, "gpt2", False)
    path = adir / "adapter_model.safetensors"
    arrays = load_safetensors(path)
    key = "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"
    arrays[key] = np.zeros((31, 2))
    save_safetensors(arrays, path)
    out = tmp_path / "out.safetensors"
    capsys.readouterr()  # drop what transformers printed while the case was written
    rc = cli_main(["reference", "--model", str(mdir), "--adapter", str(adir), "--inputs",
                   str(tmp_path / "in.safetensors"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert len(err) == 1 and key in err[0] and "shape (31, 2), expected (32, 2)" in err[0]
