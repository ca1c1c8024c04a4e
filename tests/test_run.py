"""End to end: `spectral-peft run --quick` writes the table, results.json, the figures and
runs/latest; every method is present at the matched budget; `figures` regenerates from it.

Expected values come from GPT-2's shapes, not from the code under test:
    LoRA budget  = r · Σ (d_in + d_out) over c_attn (C→3C), attn.c_proj (C→C), c_fc (C→4C),
                   mlp.c_proj (4C→C) = r · 16C per layer
    full params  = V·C + T·C + L·(12C² + 13C) + 2C   (tied head)
"""
import json
import os
import re
import subprocess
import sys

import pytest

from spectral_peft import cli
from spectral_peft.monitor import METRICS_FILE, load_metrics
from spectral_peft.results import load_results
from spectral_peft.commands.run_options import DEFAULT_METHODS, QUICK

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    out, cache = root / "runs", root / "cache"
    argv = ["run", "--quick", "--out", str(out), "--cache-dir", str(cache), "--progress", "false"]
    return root, out, cache, argv


def _spectral_peft(argv, cwd):
    """The console command in a fresh interpreter, as a user runs it: (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "spectral_peft", *argv], capture_output=True, text=True, cwd=cwd,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def first_run(quick_run):
    root, out, cache, argv = quick_run
    return _spectral_peft(argv, root)[:2]


def _table(stdout: str) -> dict:
    """method -> row cells of the printed table."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method ") and "trainable params" in line)
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


def test_run_writes_table_json_and_figures(quick_run, first_run):
    root, out, cache, _ = quick_run
    code, stdout = first_run
    assert code == 0
    latest = out / "latest"
    assert latest.exists()
    results = load_results(str(latest))
    C, L, T, r = QUICK["n_embd"], QUICK["n_layer"], QUICK["n_positions"], QUICK["r"]
    V = 256
    budget = r * 16 * C * L
    assert results["budget"]["target"] == budget
    assert results["base_model"]["params"] == V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C

    # every method present, no method missing
    assert [m["method"] for m in results["methods"]] == list(DEFAULT_METHODS)
    assert results["unavailable"] == []
    for m in results["methods"]:
        if m["method"] == "full":
            assert m["trainable_params"] == results["base_model"]["params"]
            assert m["frozen_weight_bytes"] == 0
        else:
            assert abs(m["trainable_params"] - budget) <= 0.05 * budget, m["method"]
            assert m["frozen_weight_bytes"] > 0
        assert m["peak_activation_bytes"] > 0 and m["ms_per_step"] > 0
        assert len(m["train_curve"]["loss"]) == QUICK["steps"]
        assert m["eval_curve"]["step"][0] == 0 and m["eval_curve"]["step"][-1] == QUICK["steps"]
        assert m["final_eval_loss"] == m["eval_curve"]["loss"][-1]
    by = {m["method"]: m for m in results["methods"]}
    # 4-bit bases store fewer frozen bytes than the float32 bases they replace
    assert by["qlora"]["frozen_weight_bytes"] < by["lora"]["frozen_weight_bytes"] / 2
    # LoRA-FA never keeps the adapted layers' inputs: less activation memory than LoRA
    assert by["lorafa"]["peak_activation_bytes"] < by["lora"]["peak_activation_bytes"]

    # the printed table says what the JSON says
    table = _table(stdout)
    assert sorted(table) == sorted(DEFAULT_METHODS)
    for name, m in by.items():
        cells = table[name]
        assert int(cells[1].replace(",", "")) == m["trainable_params"]
        assert int(cells[3].replace(",", "")) == m["frozen_weight_bytes"]
        assert int(cells[4].replace(",", "")) == m["peak_activation_bytes"]
        assert float(cells[5]) == pytest.approx(m["ms_per_step"], abs=0.051)
        assert float(cells[6]) == pytest.approx(m["final_eval_loss"], abs=5e-5)

    # the data it used is said
    assert "standard-library modules" in stdout and "docstrings" in stdout
    assert results["data"]["pretrain"]["sha256"] and results["data"]["finetune_eval"]["bytes"] > 0

    # figures: every one listed exists and is a PNG
    expected = {"loss_curves.png", "memory.png", "speed_quality.png", "pretraining.png", "delta_singular_values.png",
                "adalora_rank_heatmap.png", "adalora_budget.png", "adalora_singular_values.png",
                "nf4_codebooks.png", "nf4_error.png", "rosa_density.png", "rosa_support.png", "dylora_rank_eval.png",
                "metrics.png"}
    assert set(results["figures"]) == expected
    # metrics.jsonl: one line per step of every method, its losses those of the train curves
    lines = load_metrics(str(latest / METRICS_FILE))
    for m in results["methods"]:
        mine = [line for line in lines if line["method"] == m["method"]]
        assert [line["step"] for line in mine] == m["train_curve"]["step"], m["method"]
        assert [round(line["loss"], 5) for line in mine] == m["train_curve"]["loss"], m["method"]
        assert all(line["peak_rss_bytes"] > 0 and line["param_bytes"] > 0 for line in mine), m["method"]
    assert len(lines) == sum(len(m["train_curve"]["step"]) for m in results["methods"])
    for name in expected:
        with open(latest / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_second_run_reuses_the_cached_base(quick_run, first_run):
    root, out, cache, argv = quick_run
    code, stdout, _ = _spectral_peft(argv + ["--methods", "lora", "--figures", "false"], root)
    assert code == 0
    assert "base model: cached at" in stdout
    assert len([d for d in os.listdir(cache) if d.startswith("base-gpt2-")]) == 1


def test_figures_command_regenerates_from_results(quick_run, first_run, tmp_path, capsys):
    root, out, cache, _ = quick_run
    dest = tmp_path / "figs"
    assert cli.main(["figures", "--results", str(out / "latest"), "--out", str(dest)]) == 0
    results = load_results(str(out / "latest"))
    for name in results["figures"]:
        assert (dest / name).stat().st_size > 1000
    with open(dest / "results.json") as f:
        assert json.load(f) == results


def test_config_file_and_flags(tmp_path):
    from spectral_peft.commands.run_options import config_from_args

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"r": 6, "lora_alpha": 12, "target_modules": ["c_attn", "c_fc"], "steps": 9}))
    parser = cli.build_parser()
    args = parser.parse_args(["run", "--config", str(cfg_file), "--steps", "11", "--init_r", "5"])
    cfg = config_from_args(args)
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.steps, cfg.init_r) == (6, 12, "c_attn,c_fc", 11, 5)
