"""`validate`: its comparisons detect errors, missing peers are listed not crashed on, and the
checks that run here pass."""
import numpy as np
import pytest

from spectral_peft import cli, validate


def test_compare_detects_an_error_and_names_the_tensor():
    a = np.linspace(-1, 1, 50)
    ab, rel, ok, bad = validate.compare({"good": (a.copy(), a), "bad": (a + 1e-7, a)}, rtol=1e-10)
    assert not ok and bad == "bad"
    assert ab == pytest.approx(1e-7, rel=1e-6)
    ab, rel, ok, bad = validate.compare({"good": (a * (1 + 1e-13), a)}, rtol=1e-10)
    assert ok and bad == "" and ab < 1e-12


def test_compare_shape_mismatch_fails():
    _, _, ok, bad = validate.compare({"x": (np.zeros(3), np.zeros(4))}, rtol=1e-10)
    assert not ok and "shape" in bad


def test_ops_checks_pass_against_pytorch():
    pytest.importorskip("torch")
    rows, missing = validate.run_checks(["ops"], log=None)
    assert not missing
    assert len(rows) >= 9
    for r in rows:
        assert r.verdict == "PASS", (r.component, r.detail)
        assert r.max_abs < 1e-12


def test_a_missing_peer_is_listed(monkeypatch):
    def no_peer(name):
        raise validate.Missing(f"{name} is not installed (ImportError)")

    monkeypatch.setattr(validate, "_peer", no_peer)
    rows, missing = validate.run_checks(["bnb", "lora"], log=None)
    assert rows == []
    assert [(m[0], m[1]) for m in missing] == [("lora", "PEFT"), ("bnb", "bitsandbytes")]
    assert all("not installed" in m[2] for m in missing)


def test_a_failing_check_sets_exit_status_1(monkeypatch, capsys):
    def broken(rng):
        x = rng.standard_normal(5)
        return [validate._row("deliberately wrong", "itself", {"x": (x + 1.0, x)}, 1e-10)]

    monkeypatch.setattr(validate, "CHECKS", (("broken", broken, "itself"),))
    assert cli.main(["validate"]) == 1
    out = capsys.readouterr().out
    assert "deliberately wrong" in out and "FAIL" in out and "0 passed, 1 failed" in out


def test_validate_command_table(capsys):
    pytest.importorskip("torch")
    assert cli.main(["validate", "--only", "ops"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for col in ("component", "peer", "max abs error", "max rel error", "tolerance", "verdict"):
        assert col in header
    assert "ops.attention (causal)" in out and "failed" in out


@pytest.mark.slow
def test_adapter_and_quant_checks_pass():
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    rows, missing = validate.run_checks(["lora", "adalora", "adapters", "bnb"], log=None)
    assert not missing, missing
    assert {r.verdict for r in rows} == {"PASS"}, [(r.component, r.detail) for r in rows if r.verdict != "PASS"]
