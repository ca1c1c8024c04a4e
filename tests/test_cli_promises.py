"""The command line's promises: every user mistake is one line on stderr, exit status
2, and nothing left behind; `validate` fails when it checked nothing; `figures` writes only where
it says; `reference` refuses non-finite weights by key, labels that keep no token, a directory as
--out, and a config.json whose shapes disagree with the file before allocating what it implies;
every option of every command has a help line, states its default once, and a boolean says what
it accepts."""
import argparse
import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from spectral_peft import cli
from spectral_peft import validate as validate_mod
from spectral_peft.backend import ShapeBackend, get_backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(argv):
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse exits for --help and malformed flags
        return exc.code


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err!r}"
    return lines[0]


# ------------------------------------------------------------------------------------------------
# run: every option checked before the run folder is created
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--methods", "lora,LoRA"], "--methods 'lora,LoRA': 'lora' named more than once"),
    (["--methods", "lora,lora,dora"], "'lora' named more than once"),
    (["--rosa_r", "0"], "--rosa_r must be an integer >= 1"),
    (["--init_r", "0"], "--init_r must be an integer >= 1"),
    (["--blocksize", "3"], "--blocksize must be one of 32, 64, 128"),
    (["--weight_decay", "-1"], "--weight_decay must be a finite number >= 0, got -1.0"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be a finite number > 0, got 0.0"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--target_modules", "q_proj"], "--target_modules 'q_proj' on --arch gpt2: "),
    # matched on a memoryless skeleton: a 480 GB c_attn is never allocated
    (["--n_embd", "200000", "--target_modules", "q_proj"], "--target_modules 'q_proj' on --arch gpt2: "),
    (["--n_positions", "100000"], "--n_positions 100000: "),  # found by the data phase, before the folder
])
def test_run_option_errors_leave_nothing(argv, needle, tmp_path, capsys):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    code = _main(["run", "--quick", *argv, "--out", str(out), "--cache_dir", str(cache)])
    cap = capsys.readouterr()
    assert code == 2
    assert needle in _one_line(cap.err)
    assert "Traceback" not in cap.err and cap.out == ""
    assert sorted(os.listdir(tmp_path)) == []  # no run folder, no cache


@pytest.mark.parametrize("option", ["--out", "--cache_dir"])
def test_run_folder_options_that_are_files(option, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    other = "--cache_dir" if option == "--out" else "--out"
    code = _main(["run", "--quick", option, str(blocker), other, str(tmp_path / "other")])
    assert code == 2
    assert f"{option} {blocker}: exists and is not a directory" in _one_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["a_file"] and blocker.read_text() == "keep me"


@pytest.mark.parametrize("values, needle", [
    ({"lr": "fast"}, "--lr must be a number, got 'fast'"),
    ({"figures": "yes"}, "--figures must be true or false, got 'yes'"),
    ({"steps": 2.5}, "--steps must be an integer, got 2.5"),
    ({"arch": ["gpt2"]}, "--arch must be a string, got ['gpt2']"),
    ({"methods": ["lora", "LORA"]}, "'lora' named more than once"),
])
def test_run_config_file_values_of_the_wrong_type(values, needle, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    code = _main(["run", "--config", str(path), "--out", str(tmp_path / "runs")])
    assert code == 2
    assert needle in _one_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["run.json"]


# ------------------------------------------------------------------------------------------------
# validate: a run that checks nothing is not a pass
# ------------------------------------------------------------------------------------------------
def test_validate_that_checks_nothing_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(validate_mod, "run_checks",
                        lambda names, seed, log: ([], [("rosa", "peft-rosa", "peft-rosa is not installed")]))
    assert _main(["validate", "--only", "rosa"]) == 2
    cap = capsys.readouterr()
    line = _one_line(cap.err)
    assert line.startswith("spectral-peft validate: error: nothing was checked") and "peft-rosa" in line
    assert "0 passed, 0 failed, 1 not checked" in cap.out


def test_validate_with_one_passing_row_exits_0(monkeypatch, capsys):
    row = validate_mod.Row("ops", "numpy", 0.0, 0.0, "1e-10", "PASS")
    monkeypatch.setattr(validate_mod, "run_checks", lambda names, seed, log: ([row], []))
    assert _main(["validate", "--only", "ops"]) == 0
    assert capsys.readouterr().err == ""


def test_validate_only_rosa_without_peft_rosa(capsys):
    try:
        import rosa  # noqa: F401 - peft-rosa's package
        pytest.skip("peft-rosa is installed here: --only rosa checks something")
    except ImportError:
        pass
    assert _main(["validate", "--only", "rosa"]) == 2
    assert "nothing was checked" in _one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------
# figures: only where it says
# ------------------------------------------------------------------------------------------------
def _tree(root) -> dict:
    """relative path -> bytes of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder holding the committed figures/results.json and a run folder with the same."""
    committed = os.path.join(REPO, "figures", "results.json")
    (tmp_path / "figures").mkdir()
    shutil.copyfile(committed, tmp_path / "figures" / "results.json")
    (tmp_path / "run1").mkdir()
    shutil.copyfile(committed, tmp_path / "run1" / "results.json")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv", [[], ["--results", "figures"], ["--results", "figures/results.json"]])
def test_figures_refuses_the_committed_folder_without_out(project, argv, capsys):
    before = _tree(project)
    assert _main(["figures", *argv]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "committed" in line and "--out figures" in line
    assert _tree(project) == before


def test_figures_write_beside_the_results_read(project, capsys):
    before = _tree(project)
    assert _main(["figures", "--results", "run1"]) == 0
    after = _tree(project)
    new = sorted(set(after) - set(before))
    assert new and all(p.startswith("run1" + os.sep) and p.endswith(".png") for p in new)
    assert {p: after[p] for p in before} == before  # nothing written over, results.json included
    printed = [ln.split(" ", 1)[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("wrote ")]
    assert sorted(os.path.normpath(p) for p in printed) == new  # every file written is named


def test_figures_out_figures_is_asked_for(project, capsys):
    assert _main(["figures", "--results", "run1", "--out", "figures"]) == 0
    assert (project / "figures" / "loss_curves.png").stat().st_size > 1000
    assert "wrote figures/results.json" in capsys.readouterr().out  # the copy is named too


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch", reason="torch: transformers' backend")
transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoints")
transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=19, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    d = tmp_path_factory.mktemp("promises_gpt2")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(d))
    return d


def _edited(src, dst, edit_arrays=None, edit_config=None):
    os.makedirs(dst)
    arrays = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    save_file(edit_arrays(arrays) if edit_arrays else arrays, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(edit_config(cfg) if edit_config else cfg, f)
    return dst


def _inputs(labels=True):
    ids = np.array([[3, 1, 4, 1, 5, 9]], dtype=np.int64)
    return {"input_ids": ids, "labels": ids.copy()} if labels else {"input_ids": ids}


def _reference(tmp_path, model_dir, inputs, extra=()):
    inp, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(inputs, str(inp))
    return _main(["reference", "--model", str(model_dir), "--inputs", str(inp), "--out", str(out), *extra]), out


def _nan_at(key, index=(0, 0)):
    def edit(arrays):
        a = arrays[key].copy()
        a[index] = np.nan
        return {**arrays, key: a}
    return edit


def test_reference_refuses_a_nan_weight_by_key(gpt2_dir, tmp_path, capsys):
    key = "transformer.h.1.mlp.c_fc.weight"
    model = _edited(gpt2_dir, tmp_path / "nan", _nan_at(key))
    code, out = _reference(tmp_path, model, _inputs())
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert key in line and "1 non-finite value" in line and "--allow_nonfinite" in line
    assert not out.exists()


def test_reference_allow_nonfinite_computes_anyway(gpt2_dir, tmp_path, capsys):
    model = _edited(gpt2_dir, tmp_path / "nan", _nan_at("transformer.h.1.mlp.c_fc.weight"))
    code, out = _reference(tmp_path, model, _inputs(), ["--allow_nonfinite"])
    assert code == 0 and capsys.readouterr().err == ""
    assert np.isnan(load_file(str(out))["loss"])  # the NaN weight reaches the loss: what was asked for


def test_generate_refuses_a_nan_weight_by_key(gpt2_dir, tmp_path, capsys):
    key = "transformer.wte.weight"
    model = _edited(gpt2_dir, tmp_path / "nan", _nan_at(key, (3, 1)))
    inp, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(_inputs(labels=False), str(inp))
    argv = ["generate", "--model", str(model), "--inputs", str(inp), "--max_new_tokens", "2", "--out", str(out)]
    assert _main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert key in line and "non-finite" in line and "--allow_nonfinite" in line
    assert not out.exists()
    assert _main(argv + ["--allow_nonfinite"]) == 0 and out.exists()


def test_reference_refuses_a_nan_adapter_weight_by_key(gpt2_dir, tmp_path, capsys):
    from spectral_peft.adapters.lora import LoraConfig
    from spectral_peft.adapters.peft_model import get_peft_model, save_adapter
    from spectral_peft.model import load_pretrained

    pm = get_peft_model(load_pretrained(gpt2_dir, get_backend("cpu", "float64")),
                        LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    save_adapter(pm, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"
    arrays = load_file(str(path))
    assert key in arrays
    save_file(_nan_at(key)(arrays), str(path))
    code, out = _reference(tmp_path, gpt2_dir, _inputs(), ["--adapter", str(tmp_path / "adapter")])
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert key in line and "non-finite" in line and "--allow_nonfinite" in line
    assert not out.exists()
    code, out = _reference(tmp_path, gpt2_dir, _inputs(), ["--adapter", str(tmp_path / "adapter"), "--allow_nonfinite"])
    assert code == 0 and out.exists()


@pytest.mark.parametrize("labels", [
    [[-100] * 6],                   # every label ignored
    [[3] + [-100] * 5],             # only position 0 kept, which HF's shift drops
])
def test_reference_refuses_labels_that_keep_no_token(gpt2_dir, tmp_path, capsys, labels):
    inputs = {**_inputs(), "labels": np.array(labels, dtype=np.int64)}
    code, out = _reference(tmp_path, gpt2_dir, inputs)
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert "'labels' keeps no token" in line and "NaN in transformers" in line
    assert not out.exists()


def test_reference_one_kept_label_matches_transformers(gpt2_dir, tmp_path, capsys):
    """The boundary: one token kept after the shift is a loss: the cross-entropy of the one logit row
    that predicts it, from transformers' float64 logits (1e-10)."""
    labels = np.array([[-100, -100, 4, -100, -100, -100]], dtype=np.int64)
    code, out = _reference(tmp_path, gpt2_dir, {**_inputs(), "labels": labels})
    assert code == 0, capsys.readouterr().err
    tm = transformers.GPT2LMHeadModel.from_pretrained(str(gpt2_dir), attn_implementation="eager",
                                                      dtype=torch.float64).eval()
    with torch.no_grad():
        logits = tm(torch.tensor(_inputs()["input_ids"])).logits  # (1, 6, 19)
        want = torch.nn.functional.cross_entropy(logits[0, 1], torch.tensor(4)).item()  # position 1 predicts 2's label
    assert abs(float(load_file(str(out))["loss"]) - want) <= 1e-10 * max(1.0, abs(want))


def test_reference_out_naming_a_directory(gpt2_dir, tmp_path, capsys):
    inp, out = tmp_path / "in.safetensors", tmp_path / "outdir"
    out.mkdir()
    save_file(_inputs(), str(inp))
    assert _main(["reference", "--model", str(gpt2_dir), "--inputs", str(inp), "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--out {out}: is a directory" in line and "Errno" not in line
    assert os.listdir(out) == []


@pytest.mark.parametrize("edit, key", [
    (lambda c: {**c, "n_embd": 10 ** 7}, "transformer.wte.weight"),          # 2 PiB of weights implied
    (lambda c: {**c, "n_inner": 10 ** 9}, "transformer.h.0.mlp.c_fc.weight"),  # 64 GB per MLP implied
    (lambda c: {**c, "n_layer": 3}, "transformer.h.2.ln_1.weight"),
])
def test_reference_config_shapes_checked_before_allocating(gpt2_dir, tmp_path, capsys, monkeypatch, edit, key):
    from spectral_peft.model import hf
    real_new_model = hf.new_model

    def only_skeletons(model_type, config, arrays, backend, seed=0):
        if not isinstance(backend, ShapeBackend):
            pytest.fail("a model was built from a config that does not describe the file")
        return real_new_model(model_type, config, arrays, backend, seed)

    monkeypatch.setattr(hf, "new_model", only_skeletons)
    model = _edited(gpt2_dir, tmp_path / "cfg", edit_config=edit)
    tracemalloc.start()
    try:
        code, out = _reference(tmp_path, model, _inputs())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2
    assert key in _one_line(capsys.readouterr().err)
    assert peak < 64 * 2 ** 20, f"{peak / 2 ** 20:.0f} MiB traced: the config's shapes were allocated"
    assert not out.exists()


def _engine_configs():
    from spectral_peft.model import (
        BertConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )
    small = {"vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16}
    return [
        ("gpt2", GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2), {}),
        ("bert", BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=12, max_position_embeddings=8, num_labels=3),
         {"classifier.weight": None}),
        ("bert", BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=12, max_position_embeddings=8, pad_token_id=1),
         {"pooler.dense.weight": None}),
        ("llama", LlamaConfig(**small, pad_token_id=2), {}),
        ("llama", LlamaConfig(**small, tie_word_embeddings=True), {}),
        ("mistral", MistralConfig(**small, sliding_window=4), {}),
        ("qwen2", Qwen2Config(**small), {}),
    ]


@pytest.mark.parametrize("i", range(len(_engine_configs())))
def test_skeleton_has_the_real_models_shapes(i):
    """The skeleton (the loader's expected shapes) and the real model agree name for name."""
    from spectral_peft.model.hf import new_model
    model_type, config, arrays = _engine_configs()[i]
    real = new_model(model_type, config, arrays, get_backend("cpu", "float64"))
    skel = new_model(model_type, config, arrays, ShapeBackend("cpu", "float64"))
    want = {n: tuple(m.params[k].shape) for n, m, k in real.named_parameters()}
    assert {n: tuple(m.params[k].shape) for n, m, k in skel.named_parameters()} == want
    assert all(m.params[k].strides == (0,) * m.params[k].ndim for _, m, k in skel.named_parameters())


def test_skeleton_of_a_7b_llama_allocates_nothing():
    from spectral_peft.model import LlamaConfig
    from spectral_peft.model.hf import new_model
    tracemalloc.start()
    try:
        skel = new_model("llama", LlamaConfig(), {}, ShapeBackend("cpu", "float64"))  # 6.7e9 parameters
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(int(np.prod(m.params[k].shape)) for _, m, k in skel.named_parameters()) > 6e9
    assert peak < 16 * 2 ** 20


# ------------------------------------------------------------------------------------------------
# help: a line for every option, its default once, booleans say what they take
# ------------------------------------------------------------------------------------------------
def _actions():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for a in p._actions:
            if not isinstance(a, argparse._HelpAction):
                yield name, a


def test_every_command_is_walked():
    assert {name for name, _ in _actions()} == {"run", "figures", "reference", "generate", "conformance",
                                                "validate"}


@pytest.mark.parametrize("command, action", list(_actions()), ids=lambda x: x if isinstance(x, str) else
                         (x.option_strings or [x.dest])[0])
def test_every_option_has_help_and_its_default_once(command, action):
    h = action.help or ""
    assert h and h != argparse.SUPPRESS
    text = h.split(" (default:")[0]
    assert text.strip(), f"{command} {action.option_strings}: no help beyond its default: {h!r}"
    required = action.required or not action.option_strings
    assert h.count("(default:") == (0 if required else 1), f"{command} {action.option_strings}: {h!r}"
    assert "(default: (default" not in h and "(default: None)" not in h
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        assert "a flag: takes no value" in h
    if getattr(action.type, "__name__", "") == "_bool":
        assert "true or false" in h and action.metavar == "{true,false}"


def test_run_bool_options_accept_what_their_help_says(tmp_path, capsys):
    """--figures/--progress/--compress_statistics take the values their help lists."""
    from spectral_peft.commands.run_options import config_from_args
    parser = cli.build_parser()
    for word, value in (("true", True), ("off", False), ("1", True), ("no", False)):
        cfg = config_from_args(parser.parse_args(["run", "--figures", word, "--compress_statistics", word]))
        assert cfg.figures is value and cfg.compress_statistics is value
