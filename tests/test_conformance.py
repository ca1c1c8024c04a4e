"""`spectral-peft conformance` (spectral_peft/conformance/).

1. The shipped PyTorch-autograd target passes every function in float64, float32 and float16.
2. Single-line bugs of the kinds people write, planted one at a time into that target's source,
   are each caught: a FAIL for their own function and for no other, with a counterexample that
   reproduces through make_case.
3. The PEFT/bitsandbytes target's report is what docs/conformance.md states.
4. The report (table, --json) and the contract's usage errors (exit 2, one line), and the oracle
   fed the very arrays the target received.
"""
import json
import re
import types

import numpy as np
import pytest

from spectral_peft.cli import main as cli_main
from spectral_peft.conformance import FUNCTIONS, ContractError, check, make_case
from spectral_peft.conformance import suite as suite_mod
from spectral_peft.conformance.cases import build_quantize_4bit
from spectral_peft.quant.blockwise import quantize_4bit_reference, unpack_4bit

torch = pytest.importorskip("torch", reason="torch: the shipped reference target is written in PyTorch")
from spectral_peft.conformance.targets import torch_autograd  # noqa: E402

TARGET = torch_autograd.__file__
SOURCE = open(TARGET, encoding="utf-8").read()


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_the_pytorch_target_passes_every_function(dtype):
    report = check(torch_autograd, dtype=dtype, examples=60)
    failed = {r.function: r.counterexample for r in report.results if r.verdict != "PASS"}
    assert not failed, f"{dtype}: the correct target fails {failed}"
    assert [r.function for r in report.results] == list(FUNCTIONS)
    assert all(r.cases >= 60 for r in report.results)


# (function, the line as shipped, the buggy line, dtype, what the mistake is)
BUGS = [
    ("lora", "    y = _linear(X, W, b) + scaling * ((X @ A.T) @ B.T)",
     "    y = _linear(X, W, b) + ((X @ A.T) @ B.T)", "float32", "scaling forgotten"),
    ("lora", "    y = _linear(X, W, b) + scaling * ((X @ A.T) @ B.T)",
     "    y = _linear(X, W, b) + scaling / A.shape[0] * ((X @ A.T) @ B.T)", "float32", "alpha/r applied twice"),
    ("dora", "    n = torch.linalg.norm(W + scaling * (B @ A), dim=1).detach()  # (d_out,)",
     "    n = torch.linalg.norm(W + scaling * (B @ A), dim=1)  # (d_out,)", "float32", "the norm not detached"),
    ("dora", "    y = base + (g - 1) * xw + g * (scaling * ((X @ A.T) @ B.T))",
     "    y = g * base + g * (scaling * ((X @ A.T) @ B.T))", "float32", "the bias rescaled by m/n"),
    ("adalora", "    y = _linear(X, W, b) + (X @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5)",
     "    y = _linear(X, W, b) + (X @ (A * E).T @ B.T) * scaling / (A.shape[0] + 1e-5)", "float32",
     "the current rank instead of ranknum"),
    ("rosa", "    y = _linear(X, W + S, b) + scaling * ((X @ A.T) @ B.T)",
     "    y = _linear(X, W, b) + scaling * ((X @ A.T) @ B.T + X @ S.T)", "float32", "S scaled with the LoRA part"),
    ("attention", "    Kr, Vr = K.repeat_interleave(G, dim=1), Vv.repeat_interleave(G, dim=1)  # (B, H, T, D)",
     "    Kr, Vr = K.repeat(1, G, 1, 1), Vv.repeat(1, G, 1, 1)  # (B, H, T, D)", "float32",
     "K/V heads tiled instead of interleaved over the group"),
    ("attention", "    P = torch.softmax(scores, dim=-1) * visible",
     "    P = scores.exp() / scores.exp().sum(-1, keepdim=True) * visible", "float32",
     "a softmax without its max (overflows)"),
    ("attention", "    scores = (Q @ Kr.transpose(-1, -2)) / math.sqrt(Q.shape[-1])  # (B, H, T, T)",
     "    scores = (Q @ Kr.transpose(-1, -2)) / Q.shape[-1]  # (B, H, T, T)", "float64", "1/D instead of 1/√D"),
    ("rmsnorm", "    y = (w.to(ct) * (Xc * torch.rsqrt(Xc.pow(2).mean(-1, keepdim=True) + eps))).to(X.dtype)",
     "    y = (w.to(ct) * (Xc / (torch.sqrt(Xc.pow(2).mean(-1, keepdim=True)) + eps))).to(X.dtype)", "float32",
     "eps outside the square root"),
    ("rope", "    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)",
     "    return torch.cat((x[..., h:], -x[..., :h]), dim=-1)", "float32", "rotate_half's sign on the wrong half"),
    ("swiglu", "    y = F.silu(g) * u", "    y = F.silu(u) * g", "float32", "gate and up swapped"),
    ("cross_entropy", '        loss = F.cross_entropy(Z, lab, ignore_index=-100, reduction="mean")',
     '        loss = F.cross_entropy(Z, lab, ignore_index=-100, reduction="sum") / lab.numel()', "float32",
     "the -100 rows counted in the mean"),
    ("quantize_4bit", '    q = order[np.searchsorted(midpoints, s, side="left")].astype(np.uint8)',
     '    q = order[np.searchsorted(midpoints, s, side="right")].astype(np.uint8)', "float32",
     "a midpoint rounded up instead of down"),
    ("quantize_4bit", "    packed = ((q[0::2] << 4) | q[1::2]).astype(np.uint8)",
     "    packed = ((q[1::2] << 4) | q[0::2]).astype(np.uint8)", "float32", "the nibble order swapped"),
    ("dequantize_4bit", "    q[0::2], q[1::2] = flat >> 4, flat & 0x0F",
     "    q[0::2], q[1::2] = flat & 0x0F, flat >> 4", "float32", "the nibble order swapped"),
    ("adalora_budget", "        mul = 1 - (step - tinit) / (total_step - tfinal - tinit)",
     "        mul = 1 - (step - tinit - tfinal) / (total_step - tfinal - tinit)", "float32",
     "the paper's Eq. 14 typo"),
    ("adalora_budget", "        budget = int((init_budget - target_budget) * (mul ** 3) + target_budget)",
     "        budget = round((init_budget - target_budget) * (mul ** 3) + target_budget)", "float32",
     "rounding instead of truncation"),
]


def planted(tmp_path, old, new):
    assert SOURCE.count(old) == 1, f"the shipped target no longer has the line {old!r}"
    path = tmp_path / "buggy_target.py"
    path.write_text(SOURCE.replace(old, new), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("function,old,new,dtype,mistake", BUGS, ids=[f"{b[0]}: {b[4]}" for b in BUGS])
def test_a_planted_bug_fails_its_function_and_no_other(tmp_path, function, old, new, dtype, mistake):
    path = planted(tmp_path, old, new)
    buggy = check(path, only=[function], dtype=dtype, examples=100)
    (r,) = buggy.results
    assert r.verdict == "FAIL", f"{mistake}: not caught in {r.cases} cases (worst {r.worst})"
    others = check(path, only=[f for f in FUNCTIONS if f != function], dtype=dtype, examples=8)
    assert all(o.verdict == "PASS" for o in others.results), \
        f"{mistake}: blamed on {[o.function for o in others.results if o.verdict != 'PASS']}"
    # the counterexample reproduces: its spec rebuilds the case, and the buggy output is off there
    c = r.counterexample
    kwargs = make_case(function, dtype, c["spec"])
    import importlib.util
    spec = importlib.util.spec_from_file_location("buggy_again", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if c["output"] != "(raised)":
        got = suite_mod._check_outputs(function, getattr(module, function)(**kwargs),
                                       getattr(suite_mod.oracle, function)(**suite_mod._as_float64(kwargs)), dtype)
        expected = getattr(suite_mod.oracle, function)(**suite_mod._as_float64(kwargs))
        natural = suite_mod.natural_scales(function, suite_mod._as_float64(kwargs))
        err = suite_mod._error(function, c["output"], got[c["output"]], np.asarray(expected[c["output"]]), kwargs,
                               natural)
        assert err == pytest.approx(c["error"]) and err > c["tolerance"]


def test_the_peft_bitsandbytes_target_report():
    """docs/conformance.md: PEFT's LoRA, DoRA, AdaLoRA layers pass; transformers' RMSNorm and RoPE
    compute in float32 whatever the input (FAIL at float64, PASS at float32); bitsandbytes'
    dequantize_4bit returns -0.0 for FP4 code 8 where its own codebook holds +0.0 (FAIL, bit for
    bit); quantize_4bit and PEFT's budget schedule are exact; the rest is not defined."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from spectral_peft.conformance.targets import peft_bnb

    verdicts = {dt: {r.function: r for r in check(peft_bnb, dtype=dt, examples=40).results}
                for dt in ("float64", "float32")}
    for dt, v in verdicts.items():
        for f in ("lora", "dora", "adalora", "quantize_4bit", "adalora_budget"):
            assert v[f].verdict == "PASS", (dt, f, v[f].counterexample)
        for f in ("rosa", "attention", "swiglu", "cross_entropy"):
            assert v[f].verdict == "not run" and v[f].cases == 0
        d = v["dequantize_4bit"]
        assert d.verdict == "FAIL" and d.counterexample["spec"]["quant_type"] == "fp4"
    assert verdicts["float64"]["rmsnorm"].verdict == verdicts["float64"]["rope"].verdict == "FAIL"
    assert max(verdicts["float64"]["rmsnorm"].worst.values()) < 1e-6  # float32 rounding, not a wrong formula
    assert verdicts["float32"]["rmsnorm"].verdict == verdicts["float32"]["rope"].verdict == "PASS"


# ------------------------------------------------------------------------------------------------
# the cases, the oracle's inputs, the report
# ------------------------------------------------------------------------------------------------
def test_quantize_cases_hit_every_code_and_the_midpoints():
    for qt in ("nf4", "fp4"):
        hit = set()
        for seed in range(6):
            kw = build_quantize_4bit({"n": 64, "blocksize": 64, "quant_type": qt, "zero_block": False, "seed": seed})
            packed, _ = quantize_4bit_reference(kw["weight"], 64, qt)
            hit |= set(unpack_4bit(packed, 64).tolist())
        assert hit == set(range(16)), f"{qt}: codes never drawn: {sorted(set(range(16)) - hit)}"


def test_the_oracle_gets_the_arrays_the_target_got_widened(monkeypatch):
    calls = {"target": [], "oracle": []}

    def target_lora(**kw):
        calls["target"].append({k: v.copy() for k, v in kw.items() if isinstance(v, np.ndarray)})
        return torch_autograd.lora(**kw)

    real = suite_mod.oracle.lora

    def spy(**kw):
        calls["oracle"].append({k: v.copy() for k, v in kw.items() if isinstance(v, np.ndarray)})
        return real(**kw)

    monkeypatch.setattr(suite_mod.oracle, "lora", spy)
    module = types.ModuleType("user_module")
    module.lora = target_lora
    report = check(module, only=["lora"], dtype="float16", examples=3)
    assert report.results[0].verdict == "PASS"
    # per case: the answer (before the target runs), then the natural scale (the oracle on |inputs|)
    assert len(calls["oracle"]) == 2 * len(calls["target"]) == 6
    for target_args, oracle_args in zip(calls["target"], calls["oracle"][0::2]):
        for k, a in target_args.items():
            assert a.dtype == np.float16 and oracle_args[k].dtype == np.float64, k
            np.testing.assert_array_equal(oracle_args[k], a.astype(np.float64), err_msg=k)


def test_the_command_table_json_and_exit_status(tmp_path, capsys):
    bad = planted(tmp_path, "    y = F.silu(g) * u", "    y = F.silu(u) * g")
    out = tmp_path / "report.json"
    assert cli_main(["conformance", bad, "--only", "swiglu,rope", "--examples", "20", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert re.search(r"^swiglu\s+\d+\s+output .* FAIL$", text, re.M) and re.search(r"^rope\s+\d+ .* PASS$", text, re.M)
    assert "make_case('swiglu', 'float32', {" in text
    report = json.loads(out.read_text())
    rows = {r["function"]: r for r in report["results"]}
    assert set(rows) == {"swiglu", "rope"} and report["passed"] is False
    assert rows["swiglu"]["verdict"] == "FAIL" and rows["swiglu"]["counterexample"]["output"] in (
        "output", "grad_gate", "grad_up")
    assert set(rows["rope"]) == {"function", "verdict", "cases", "worst", "tolerance", "counterexample"}
    assert cli_main(["conformance", TARGET, "--only", "rope", "--examples", "5"]) == 0


def _module_file(tmp_path, body):
    p = tmp_path / "user_target.py"
    p.write_text("import numpy as np\n" + body, encoding="utf-8")
    return str(p)


USAGE = [
    ("def lora(x, weight):\n    return {}\n", "lora: the signature .* does not take"),
    ("def swiglu(gate, up, grad_output):\n    return {'output': gate}\n", "swiglu returned no 'grad_gate'"),
    ("def swiglu(gate, up, grad_output):\n    return {'output': gate.reshape(-1), 'grad_gate': gate, 'grad_up': up}\n",
     "swiglu: 'output' has shape"),
    ("def swiglu(gate, up, grad_output):\n    g = gate.astype(np.float64)\n"
     "    return {'output': g, 'grad_gate': g, 'grad_up': g}\n", "swiglu: 'output' has dtype float64, expected float32"),
    ("def swiglu(gate, up, grad_output):\n    return [gate]\n", "swiglu must return a dict"),
    ("x = 1\n", "defines none of the contract functions"),
    ("raise RuntimeError('broken at import')\n", "could not be imported: RuntimeError: broken at import"),
]


@pytest.mark.parametrize("body,message", USAGE, ids=[m for _, m in USAGE])
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, body, message):
    path = _module_file(tmp_path, body)
    assert cli_main(["conformance", path, "--examples", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spectral-peft conformance: error:"), err
    assert re.search(message, err), f"{message!r} not in {err!r}"


@pytest.mark.parametrize("argv,message", [
    (["--only", "lora,nope"], "'nope' is not a contract function"),
    (["--examples", "0"], "--examples must be an integer >= 1"),
    (["--json", "/nonexistent-dir/r.json"], "does not exist"),
])
def test_bad_options_exit_2(capsys, argv, message):
    assert cli_main(["conformance", TARGET] + argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_target_that_raises_on_a_case_fails_with_the_error_named(tmp_path):
    path = _module_file(tmp_path, "def swiglu(gate, up, grad_output):\n"
                                  "    if gate.shape[0] == 1:\n        raise IndexError('one row')\n"
                                  "    s = 1 / (1 + np.exp(-gate))\n"
                                  "    return {'output': gate * s * up, 'grad_gate': (s + gate * s * (1 - s)) * up * "
                                  "grad_output, 'grad_up': gate * s * grad_output}\n")
    (r,) = check(path, only=["swiglu"], examples=40).results
    assert r.verdict == "FAIL" and r.counterexample["output"] == "(raised)"
    assert "IndexError: one row" in r.counterexample["raised"] and r.counterexample["spec"]["N"] == 1


def test_check_refuses_bad_arguments_before_work():
    with pytest.raises(ContractError, match="--dtype must be one of"):
        check(torch_autograd, dtype="bfloat16")
    with pytest.raises(ValueError, match="unknown conformance function 'nope'"):
        make_case("nope", "float32", {})
