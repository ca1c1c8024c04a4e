"""The console script: each command's help, and bad arguments -> one clear line and exit status 2."""
import json

import pytest

from spectral_peft import cli


def _exit_code(argv):
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse exits for --help and for malformed flags
        return exc.code


@pytest.mark.parametrize("command", ["run", "figures", "validate", "reference"])
def test_help_of_every_command(command, capsys):
    assert _exit_code([command, "--help"]) == 0
    assert command in capsys.readouterr().out


def test_no_or_unknown_command(capsys):
    assert _exit_code([]) == 2
    assert "required" in capsys.readouterr().err
    assert _exit_code(["train-everything"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["run", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["run", "--methods", "lora,sparse-magic"], "unknown ['sparse-magic']"),
    (["run", "--n_embd", "100", "--n_head", "3"], "--n_embd 100 must be divisible by --n_head 3"),
    (["run", "--quant_type", "int3"], "--quant_type must be 'nf4' or 'fp4', got 'int3'"),
    (["run", "--init_r", "4", "--target_r", "6"], "--target_r 6 exceeds --init_r 4"),
    (["run", "--lora_dropout", "1.5"], "--lora_dropout must lie in [0, 1), got 1.5"),
    (["run", "--device", "tpu"], "--device must be one of cpu, gpu, gpu-emulated"),
    (["run", "--threads", "-1"], "--threads must be an integer >= 0"),
    (["run", "--schedule", "warmup-then-sparse"], "method rosa: "),
    (["run", "--dylora_mode", "sometimes"], "method dylora: "),
    (["run", "--steps", "10", "--tinit", "8", "--tfinal", "5"], "method adalora: "),
    (["run", "--arch", "bert"], "--arch must be one of gpt2, llama, got 'bert'"),
    (["run", "--arch", "llama", "--n_embd", "96", "--n_head", "3"], "--arch llama needs an even --n_head"),
    (["run", "--arch", "llama", "--target_modules", "c_attn,c_fc"],
     "--target_modules 'c_attn,c_fc' on --arch llama: target_modules ['c_attn', 'c_fc'] match no linear layer"),
    (["run", "--target_modules", "q_proj"], "--target_modules 'q_proj' on --arch gpt2: "),
])
def test_run_rejects_bad_values(argv, needle, capsys, tmp_path):
    assert _exit_code(argv + ["--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # rejected before any work


def test_run_gpu_without_a_gpu_is_a_clear_error(capsys):
    from spectral_peft.backend import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is present here")
    assert _exit_code(["run", "--device", "gpu"]) == 2
    assert f"--device gpu: {reason}" in capsys.readouterr().err


def test_run_rejects_malformed_flags(capsys):
    assert _exit_code(["run", "--steps", "many"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert _exit_code(["run", "--figures", "perhaps"]) == 2
    assert "expected true or false" in capsys.readouterr().err
    assert _exit_code(["run", "--no-such-flag"]) == 2


def test_run_rejects_bad_config_files(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert _exit_code(["run", "--config", str(missing)]) == 2
    assert "cannot read it" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _exit_code(["run", "--config", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"rank": 8}))
    assert _exit_code(["run", "--config", str(unknown)]) == 2
    assert "unknown option(s) ['rank']" in capsys.readouterr().err


def test_figures_rejects_missing_or_foreign_results(tmp_path, capsys):
    assert _exit_code(["figures", "--results", str(tmp_path / "none"), "--out", str(tmp_path / "f")]) == 2
    assert "no results file" in capsys.readouterr().err
    foreign = tmp_path / "results.json"
    foreign.write_text(json.dumps({"schema": "something else"}))
    assert _exit_code(["figures", "--results", str(foreign), "--out", str(tmp_path / "f")]) == 2
    assert "field 'schema'" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_validate_rejects_unknown_checks(capsys):
    assert _exit_code(["validate", "--only", "ops,warp-drive"]) == 2
    err = capsys.readouterr().err
    assert "unknown check(s) ['warp-drive']" in err and "choose from" in err
