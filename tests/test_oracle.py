"""The `reference` command (the oracle): outputs and gradients against transformers + torch
autograd in float64, HF key layout of every gradient, and the error contract (one line, exit 2,
no output file)."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from spectral_peft import cli
from spectral_peft.testing import assert_close

torch = pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
transformers = pytest.importorskip("transformers", reason="transformers: the Hugging Face model peer these comparisons run against")
transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=19, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    tm = transformers.GPT2LMHeadModel(cfg)
    d = tmp_path_factory.mktemp("oracle_gpt2")
    tm.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(2)
    cfg = transformers.BertConfig(vocab_size=19, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=12, max_position_embeddings=8, num_labels=3)
    d = tmp_path_factory.mktemp("oracle_bert")
    transformers.BertForSequenceClassification(cfg).save_pretrained(str(d))
    return d


def run(tmp_path, model_dir, inputs, capsys, extra=()):
    inp, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(inputs, str(inp))
    code = cli.main(["reference", "--model", str(model_dir), "--inputs", str(inp), "--out", str(out), *extra])
    err = capsys.readouterr().err
    return code, err, out


def gpt2_inputs():
    ids = np.array([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 0, 0]], dtype=np.int64)
    mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]], dtype=np.int64)
    labels = np.where(mask == 1, ids, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_gpt2_reference_matches_torch(gpt2_dir, tmp_path, capsys):
    inputs = gpt2_inputs()
    code, err, out = run(tmp_path, gpt2_dir, inputs, capsys)
    assert code == 0, err
    res = load_file(str(out))
    tm = transformers.GPT2LMHeadModel.from_pretrained(str(gpt2_dir), attn_implementation="eager",
                                                      dtype=torch.float64).eval()
    t = tm(input_ids=torch.tensor(inputs["input_ids"]), attention_mask=torch.tensor(inputs["attention_mask"]))
    logits = t.logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 19),
                                             torch.tensor(inputs["labels"])[:, 1:].reshape(-1))
    loss.backward()
    assert res["logits"].dtype == np.float64
    real = inputs["attention_mask"].astype(bool)
    assert_close(res["logits"][real], logits.detach().numpy()[real], "logits", 1e-10)
    assert_close(res["loss"], np.array(loss.item()), "loss", 1e-10)
    file_keys = set(load_file(str(gpt2_dir / "model.safetensors")))
    grads = {k[len("grad."):]: v for k, v in res.items() if k.startswith("grad.")}
    assert set(grads) == file_keys, "one gradient per key of the model file"
    tp = dict(tm.named_parameters())
    for key, g in grads.items():
        e = tp[key].grad.numpy()
        assert g.shape == e.shape  # Conv1D gradients in the file's (d_in, d_out) layout
        assert_close(g, e, key, 1e-10)


def test_bert_reference_matches_torch(bert_dir, tmp_path, capsys):
    ids = np.array([[5, 7, 8, 2], [4, 3, 0, 0]], dtype=np.int64)
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64),
              "token_type_ids": np.array([[0, 0, 1, 1], [0, 1, 0, 0]], dtype=np.int64),
              "labels": np.array([2, 0], dtype=np.int64)}
    code, err, out = run(tmp_path, bert_dir, inputs, capsys)
    assert code == 0, err
    res = load_file(str(out))
    tm = transformers.BertForSequenceClassification.from_pretrained(str(bert_dir), attn_implementation="eager",
                                                                     dtype=torch.float64).eval()
    t = tm(**{k: torch.tensor(v) for k, v in inputs.items()})
    t.loss.backward()
    assert_close(res["logits"], t.logits.detach().numpy(), "logits", 1e-10)
    assert_close(res["loss"], np.array(t.loss.item()), "loss", 1e-10)
    scale = max(float(p.grad.abs().max()) for p in tm.parameters())
    for key, p in tm.named_parameters():
        e = p.grad.numpy()
        floor = 1e-13 * scale if float(np.abs(e).max()) < 1e-9 * scale else None  # key biases: exactly 0
        assert_close(res[f"grad.{key}"], e, key, 1e-10, atol=floor)


def test_bare_bert_with_upstream_gradient(bert_dir, tmp_path, capsys):
    tb = transformers.BertForSequenceClassification.from_pretrained(str(bert_dir), dtype=torch.float64)
    bare = tmp_path / "bare"
    tb.bert.save_pretrained(str(bare))
    ids = np.array([[5, 7, 8]], dtype=np.int64)
    G = np.random.default_rng(0).standard_normal((1, 3, 8))
    code, err, out = run(tmp_path, bare, {"input_ids": ids, "dlogits": G}, capsys)
    assert code == 0, err
    res = load_file(str(out))
    assert "logits" not in res and "loss" not in res
    tm = transformers.BertModel.from_pretrained(str(bare), attn_implementation="eager", dtype=torch.float64).eval()
    t = tm(input_ids=torch.tensor(ids))
    (t.last_hidden_state * torch.tensor(G)).sum().backward()
    assert_close(res["last_hidden_state"], t.last_hidden_state.detach().numpy(), "last_hidden_state", 1e-10)
    g = res["grad.encoder.layer.0.intermediate.dense.weight"]
    assert_close(g, tm.encoder.layer[0].intermediate.dense.weight.grad.numpy(), "dense grad", 1e-10)
    assert np.all(res["grad.pooler.dense.weight"] == 0), "the pooler does not reach last_hidden_state"


def test_float32_and_no_labels_writes_only_outputs(gpt2_dir, tmp_path, capsys):
    code, err, out = run(tmp_path, gpt2_dir, {"input_ids": np.array([[1, 2]], dtype=np.int64)}, capsys,
                         ("--dtype", "float32"))
    assert code == 0, err
    res = load_file(str(out))
    assert set(res) == {"logits"} and res["logits"].dtype == np.float32


def break_file(src, dst, edit_arrays=None, edit_config=None):
    os.makedirs(dst, exist_ok=True)
    arrays = load_file(str(src / "model.safetensors"))
    cfg = json.load(open(src / "config.json"))
    save_file(edit_arrays(arrays) if edit_arrays else arrays, str(dst / "model.safetensors"))
    json.dump(edit_config(cfg) if edit_config else cfg, open(dst / "config.json", "w"))
    return dst


@pytest.mark.parametrize("case, match", [
    ("missing_key", "transformer.h.1.mlp.c_fc.bias"),
    ("wrong_shape", "transformer.wpe.weight"),
    ("model_type", "model_type"),
    ("bad_ids", "input_ids"),
    ("unknown_input", "pixel_values"),
    ("long_T", "n_positions"),
    ("no_model_dir", "config.json"),
    ("bad_labels", "labels"),
])
def test_errors_exit_2_one_line_no_file(gpt2_dir, tmp_path, capsys, case, match):
    model_dir = gpt2_dir
    inputs = gpt2_inputs()
    if case == "missing_key":
        model_dir = break_file(gpt2_dir, tmp_path / "m", lambda a: {k: v for k, v in a.items()
                                                                     if k != "transformer.h.1.mlp.c_fc.bias"})
    elif case == "wrong_shape":
        model_dir = break_file(gpt2_dir, tmp_path / "m", lambda a: {**a, "transformer.wpe.weight": np.zeros((8, 9), np.float32)})
    elif case == "model_type":
        model_dir = break_file(gpt2_dir, tmp_path / "m", edit_config=lambda c: {**c, "model_type": "t5"})
    elif case == "bad_ids":
        inputs["input_ids"] = inputs["input_ids"] + 100
    elif case == "unknown_input":
        inputs["pixel_values"] = np.zeros(3, np.float32)
    elif case == "long_T":
        inputs = {"input_ids": np.zeros((1, 9), np.int64)}
    elif case == "no_model_dir":
        model_dir = tmp_path / "nowhere"
    elif case == "bad_labels":
        inputs["labels"] = inputs["labels"][:, :3].copy()
    code, err, out = run(tmp_path, model_dir, inputs, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], err
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == [], "no temporary left behind"


def test_missing_required_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["reference", "--model", "x"])
    assert e.value.code == 2


def test_adapter_branch_writes_only_adapter_keys(tmp_path, capsys):
    """Smoke test of --adapter (the adapter files of adapters/peft_model.py; their parity is
    tested there): OUT holds the adapter file's keys, and the base gets no gradient entry."""
    from spectral_peft.adapters.lora import LoraConfig
    from spectral_peft.adapters.peft_model import get_peft_model
    from spectral_peft.backend import get_backend
    from spectral_peft.adapters.peft_model import save_adapter
    from spectral_peft.model import GPT2Config, GPT2LMHeadModel, load_pretrained, save_pretrained

    be = get_backend("cpu", "float64")
    save_pretrained(GPT2LMHeadModel(GPT2Config(vocab_size=19, n_positions=8, n_embd=8, n_layer=1, n_head=2), be),
                    tmp_path / "base")
    pm = get_peft_model(load_pretrained(tmp_path / "base", be), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    save_adapter(pm, tmp_path / "adapter")
    ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
    code, err, out = run(tmp_path, tmp_path / "base", {"input_ids": ids, "labels": ids}, capsys,
                         ("--adapter", str(tmp_path / "adapter")))
    assert code == 0, err
    res = load_file(str(out))
    file_keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert {k[len("grad."):] for k in res if k.startswith("grad.")} == file_keys
    g_B = res["grad.base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert np.abs(g_B).max() > 0, "lora_B starts at zero but its gradient does not"
