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


def test_the_table_shows_the_error_its_verdict_uses():
    """A near-zero entry makes |a − e| / |e| huge (here 1e4) on a row that passes; the table shows
    max |a − e| / (S + |e|), which is <= rtol exactly when the row passes."""
    e = np.array([1.0, -0.5, 1e-14])
    a = e + np.array([0.0, 0.0, 1e-10 * 0.9])  # elementwise rel error 9e3, scale-relative 9e-11
    row = validate._row("near-zero entry", "itself", {"x": (a, e)}, 1e-10)
    assert row.verdict == "PASS"
    assert row.scaled == pytest.approx(0.9e-10 / (1.0 + 1e-14), rel=1e-6)
    assert row.max_abs == pytest.approx(0.9e-10, rel=1e-6)
    table = validate.format_rows([row])
    assert "9.00e-11" in table and "PASS" in table
    assert "9.00e+03" not in table  # the elementwise relative error is not what the verdict uses
    worse = validate._row("just out", "itself", {"x": (e + np.array([0.0, 0.0, 1.1e-10]), e)}, 1e-10)
    assert worse.verdict == "FAIL" and worse.scaled == pytest.approx(1.1e-10, rel=1e-6)


@pytest.mark.parametrize("rtol", [1e-10, 1e-5])
def test_verdict_is_scaled_error_against_rtol(rtol):
    """Over random tensors and error sizes, PASS exactly when the shown error is <= rtol, and the
    shown error is the element test's own ratio, computed independently here."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        e = rng.standard_normal(7) * 10.0 ** rng.integers(-3, 3)
        e[rng.integers(0, 7)] *= 1e-12  # a near-zero entry
        a = e + rng.standard_normal(7) * rtol * np.abs(e).max() * 10.0 ** rng.uniform(-1, 1)
        row = validate._row("r", "p", {"x": (a, e)}, rtol)
        expected = max(abs(ai - ei) / (np.abs(e).max() + abs(ei)) for ai, ei in zip(a, e))
        assert row.scaled == pytest.approx(expected, rel=1e-12)
        assert (row.verdict == "PASS") == (row.scaled <= rtol)


def test_scaled_error_of_an_all_zero_tensor():
    assert validate.scaled_error(np.zeros(3), np.zeros(3), 0.0) == 0.0
    assert validate.scaled_error(np.array([0.0, 1e-300]), np.zeros(2), 0.0) == np.inf


def test_compare_shape_mismatch_fails():
    _, _, ok, bad = validate.compare({"x": (np.zeros(3), np.zeros(4))}, rtol=1e-10)
    assert not ok and "shape" in bad


def test_ops_checks_pass_against_pytorch():
    pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
    rows, missing = validate.run_checks(["ops"], log=None)
    assert not missing
    assert len(rows) >= 9
    for r in rows:
        assert r.verdict == "PASS", (r.component, r.detail)
        assert r.max_abs < 1e-12
        assert r.scaled <= 1e-10


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
    pytest.importorskip("torch", reason="torch: the autograd peer these comparisons run against")
    assert cli.main(["validate", "--only", "ops"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for col in ("component", "peer", "max abs error", "scaled error", "tolerance", "verdict"):
        assert col in header
    assert "ops.attention (causal)" in out and "failed" in out


@pytest.mark.slow
def test_adapter_and_quant_checks_pass():
    pytest.importorskip("peft", reason="peft: the PEFT peer these comparisons run against")
    pytest.importorskip("bitsandbytes", reason="bitsandbytes: the 4-bit quantisation peer")
    rows, missing = validate.run_checks(["lora", "adalora", "adapters", "bnb"], log=None)
    assert not missing, missing
    assert {r.verdict for r in rows} == {"PASS"}, [(r.component, r.detail) for r in rows if r.verdict != "PASS"]
