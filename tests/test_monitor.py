"""MetricsLog (spectral_peft.monitor): the fields it adds to a step's metrics, the JSON lines it
writes, the TensorBoard scalars, rank 0 alone writing; and the metrics figure drawn from the lines.

The model is the resume tests' tiny GPT-2 with LoRA (tests/_train_worker.py) trained by the real
Trainer; the log is called as the Trainer's hook calls it, with the step's metrics. Expected bytes
are counted here from the arrays themselves (sizes × itemsize), and compared with memory_report too.
"""
from __future__ import annotations

import itertools
import json
import os
import sys

import numpy as np
import pytest

from spectral_peft.memory import memory_report
from spectral_peft.monitor import METRICS_FILE, MetricsLog, load_metrics

sys.path.insert(0, os.path.dirname(__file__))
import _train_worker as W  # noqa: E402

FIELDS = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "kv_cache_bytes", "peak_rss_bytes",
          "device_bytes")


def run_logged(tmp_path, steps=4, method="lora", **log_kwargs):
    """(trainer, log, [merged metrics per step]) of ``steps`` Trainer steps, each passed to the log."""
    trainer, batches = W.build(method, "float32")
    log = MetricsLog(tmp_path / METRICS_FILE, trainer.model, trainer.optimizer, **log_kwargs)
    merged = []
    for t in range(steps):
        m = trainer.train_step(batches.batch(t))
        merged.append({**m, **log(trainer, m)})
    log.close()
    return trainer, log, merged


def test_fields_bytes_and_lines(tmp_path):
    trainer, _, merged = run_logged(tmp_path, fields={"method": "lora"})
    model, opt = trainer.model, trainer.optimizer
    trainable = [m.params[k] for _, m, k in model.named_parameters(trainable_only=True)]
    everything = {id(m.params[k]): m.params[k] for _, m, k in model.named_parameters()}
    n_trainable_bytes = sum(a.size * a.itemsize for a in trainable)
    report = memory_report(model, opt)
    for m in merged:
        missing = [f for f in FIELDS if f not in m]
        assert not missing, f"step {m['step']}: fields {missing} absent"
        assert m["param_bytes"] == sum(a.size * a.itemsize for a in everything.values()) == report["param_bytes"]
        assert m["grad_bytes"] == n_trainable_bytes == report["grad_bytes"]
        assert m["optimizer_bytes"] == 2 * n_trainable_bytes == report["optimizer_bytes"]  # AdamW: m and v
        assert m["kv_cache_bytes"] == 0
        assert m["device_bytes"] is None  # a CPU backend has no device pool
        assert m["activation_bytes"] > 0
    rss = [m["peak_rss_bytes"] for m in merged]
    assert rss[0] > 2**20, f"peak RSS {rss[0]} bytes: not converted from KiB?"
    assert all(b >= a for a, b in itertools.pairwise(rss)), f"peak RSS decreased: {rss}"

    with open(tmp_path / METRICS_FILE, encoding="utf-8") as f:
        rows = [json.loads(r) for r in f.read().splitlines()]
    assert len(rows) == len(merged) == 4
    for row, m in zip(rows, merged):
        assert row["method"] == "lora"
        assert row["step"] == m["step"] and row["loss"] == m["loss"] and row["ms"] == m["ms"]
        for f in FIELDS:
            assert row[f] == m[f], f"{f}: line {row[f]!r}, metrics {m[f]!r}"
    assert load_metrics(tmp_path / METRICS_FILE) == rows


def test_kv_cache_bytes(tmp_path):
    from spectral_peft.backend import get_backend
    from spectral_peft.model import KVCache

    kv = KVCache(2, 3, 10, 2, 4, get_backend("cpu", "float32"))
    _, _, merged = run_logged(tmp_path, steps=1, kv_cache=kv)
    assert merged[0]["kv_cache_bytes"] == 2 * 2 * 3 * 2 * 10 * 4 * 4  # k and v · layers · B · Hkv · M · hd · 4 bytes


def test_memory_follows_new_optimizer_state(tmp_path):
    """The cached report is recomputed once the optimiser allocates slots for more parameters."""
    trainer, batches = W.build("lora", "float32")
    log = MetricsLog(tmp_path / METRICS_FILE, trainer.model, trainer.optimizer)
    m = trainer.train_step(batches.batch(0))
    first = log(trainer, m)["optimizer_bytes"]
    name = next(iter(trainer.optimizer.state))
    trainer.optimizer.state[name + ".extra"] = {"exp_avg": np.zeros(1000, np.float32)}
    assert log(trainer, m)["optimizer_bytes"] == first + 4000
    log.close()


def test_non_finite_written_as_null_and_cut_line_dropped(tmp_path):
    trainer, batches = W.build("lora", "float32")
    path = tmp_path / METRICS_FILE
    log = MetricsLog(path, trainer.model, trainer.optimizer)
    m = trainer.train_step(batches.batch(0))
    log(trainer, {**m, "loss": float("nan"), "tokens_per_s": float("inf"), "skipped": True})
    log.close()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 2, "lo')  # a run killed mid-line
    rows = load_metrics(path)
    assert len(rows) == 1 and rows[0]["loss"] is None and rows[0]["tokens_per_s"] is None
    assert rows[0]["skipped"] is True


class _Comm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def test_only_rank_zero_writes(tmp_path):
    _, _, merged = run_logged(tmp_path / "r1", steps=1, comm=_Comm(1, 2))
    assert not os.path.exists(tmp_path / "r1" / METRICS_FILE)
    assert all(f in merged[0] for f in FIELDS)  # every rank still gets the fields
    run_logged(tmp_path / "r0", steps=1, comm=_Comm(0, 2))
    assert len(load_metrics(tmp_path / "r0" / METRICS_FILE)) == 1


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    _, _, merged = run_logged(tmp_path, steps=3, tensorboard_dir=tmp_path / "tb")
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["tensors"]
    for tag in ("loss", "ms", "tokens_per_s", "param_bytes", "peak_rss_bytes", "activation_bytes"):
        assert tag in tags, f"{tag} not among the event file's tags {tags}"
    events = acc.Tensors("loss")
    assert [e.step for e in events] == [m["step"] for m in merged]
    got = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events]
    np.testing.assert_allclose(got, [m["loss"] for m in merged], rtol=1e-6)  # stored as float32
    rss = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("peak_rss_bytes")]
    np.testing.assert_allclose(rss, [m["peak_rss_bytes"] for m in merged], rtol=1e-6)


def test_tensorboard_missing_names_the_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    trainer, _ = W.build("lora", "float32")
    with pytest.raises(ModuleNotFoundError, match="pip install tensorboard"):
        MetricsLog(tmp_path / METRICS_FILE, trainer.model, trainer.optimizer, tensorboard_dir=tmp_path / "tb")


# --- the figure ---------------------------------------------------------------------------------
def _lines():
    """Two methods of three steps each, and values a reader can check by eye."""
    out = []
    for method, tps, grad in (("lora", 1000.0, 2**20), ("full", 400.0, 2**24)):
        for step in (1, 2, 3):
            out.append({"method": method, "step": step, "tokens_per_s": tps * step, "peak_rss_bytes": (100 + step) * 2**20,
                        "param_bytes": 2**25, "grad_bytes": grad, "optimizer_bytes": 2 * grad,
                        "activation_bytes": step * 2**21})
    out[4]["tokens_per_s"] = None  # a skipped step of full: a gap
    return out


def test_metrics_figure_draws_its_input(tmp_path, monkeypatch):
    from spectral_peft.plots import metrics as metrics_plots

    drawn = []
    real_save = metrics_plots.save
    monkeypatch.setattr(metrics_plots, "save", lambda fig, path: (drawn.append(fig), real_save(fig, path)))
    lines = _lines()
    path = tmp_path / "metrics.png"
    metrics_plots.plot_metrics(lines, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    (fig,) = drawn
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [p[1] for p in metrics_plots.PANELS]
    for ax, (field, _, scale, _) in zip(axes, metrics_plots.PANELS):
        got = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
        assert set(got) == {"LoRA", "full FT"}, got.keys()
        for method, name in (("lora", "LoRA"), ("full", "full FT")):
            rows = [r for r in lines if r["method"] == method]
            want = [np.nan if r[field] is None else r[field] * scale for r in rows]
            assert got[name][0] == [r["step"] for r in rows]
            np.testing.assert_array_equal(got[name][1], want, err_msg=f"{field} of {method}")


def test_lines_without_a_method_are_one_series():
    from spectral_peft.plots.metrics import series

    lines = [{k: v for k, v in ln.items() if k != "method"} for ln in _lines()]
    assert list(series(lines)) == [""] and len(series(lines)[""]) == 6


def test_figures_command_draws_metrics_beside_results(tmp_path, capsys):
    """`spectral-peft figures` draws metrics.png when a metrics.jsonl is beside results.json, and
    copies it with --out; without one it says the figure is not available."""
    import shutil

    from spectral_peft import cli

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = tmp_path / "run1"
    run.mkdir()
    shutil.copyfile(os.path.join(repo, "figures", "results.json"), run / "results.json")
    assert cli.main(["figures", "--results", str(run), "--out", str(tmp_path / "a")]) == 0
    assert "figure metrics.png: not available: no metrics.jsonl beside the results" in capsys.readouterr().out
    assert not (tmp_path / "a" / "metrics.png").exists()

    with open(run / METRICS_FILE, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(ln) + "\n" for ln in _lines())
    assert cli.main(["figures", "--results", str(run), "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'b' / 'metrics.png'}" in out
    assert (tmp_path / "b" / "metrics.png").stat().st_size > 1000
    assert load_metrics(tmp_path / "b" / METRICS_FILE) == load_metrics(run / METRICS_FILE)


# --- --tensorboard DIR ----------------------------------------------------------------------------
def _run_config(argv):
    import argparse

    from spectral_peft.commands.run_options import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_tensorboard_option(tmp_path, monkeypatch):
    assert _run_config([]).tensorboard is None
    assert _run_config(["--tensorboard", str(tmp_path / "tb")]).tensorboard == str(tmp_path / "tb")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"--tensorboard .*pip install tensorboard"):
        _run_config(["--tensorboard", str(tmp_path / "tb")])


def test_a_step_after_close_appends(tmp_path):
    """fit() closes the log when it ends; a later fit (resume, more steps) appends to the same file."""
    trainer, log, _ = run_logged(tmp_path, steps=2)
    m = trainer.train_step(W.build("lora", "float32")[1].batch(2))
    log(trainer, m)
    log.close()
    assert [r["step"] for r in load_metrics(tmp_path / METRICS_FILE)] == [1, 2, 3]


# --- benchmarks/scaling.py's cost model ------------------------------------------------------------
def _scaling():
    import importlib.util

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, bench)  # scaling.py imports its neighbours _threads, _common and lora
    try:
        spec = importlib.util.spec_from_file_location("scaling_bench", os.path.join(bench, "scaling.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(bench)
    return mod


def test_ring_fit_recovers_alpha_and_beta():
    """Times made by t = α + S/β (2 ranks), with ±5% multiplicative noise: the relative least
    squares gives α and β back within 5%; a ring's 2(N−1)/N factor and the per-hop latency."""
    sc = _scaling()
    alpha, beta = 3e-6, 6e9
    rng = np.random.default_rng(0)
    sizes = [2**k for k in range(10, 27, 2)]
    t32 = {s: (alpha + s / beta) * (1 + 0.05 * rng.uniform(-1, 1)) for s in sizes}
    t64 = {s: (alpha + s / beta) * (1 + 0.05 * rng.uniform(-1, 1)) for s in sizes}
    a, b = sc.fit_ring(t32, t64)
    assert abs(a / alpha - 1) < 0.05 and abs(b / beta - 1) < 0.05, (a, b)
    assert sc.ring_time(1, 1e6, alpha, beta) == 0.0
    assert sc.ring_time(2, 1e6, alpha, beta) == pytest.approx(alpha + 1e6 / beta, rel=1e-12)
    assert sc.ring_time(8, 1e6, alpha, beta) == pytest.approx(alpha + 2 * 7 / 8 * 1e6 / beta, rel=1e-12)
    assert sc.ring_time(8, 1e6, alpha, beta, per_hop=True) == pytest.approx(7 * alpha + 2 * 7 / 8 * 1e6 / beta,
                                                                              rel=1e-12)
    pred = sc.predict(100.0, 10**6, alpha, beta)
    assert pred[1]["efficiency"] == 1.0
    assert pred[1024]["efficiency"] == pytest.approx(100.0 / (100.0 + 1e3 * (alpha + 2 * 1023 / 1024 * 1e6 / beta)))


def test_device_bytes_reads_cupys_pool_on_a_gpu_backend(monkeypatch):
    """On the GPU backend device_bytes is CuPy's default pool's used_bytes() (a stand-in cupy
    module here: no GPU); the CPU and the emulated GPU have no pool."""
    import types

    from spectral_peft.monitor import device_bytes

    fake = types.ModuleType("cupy")
    fake.get_default_memory_pool = lambda: types.SimpleNamespace(used_bytes=lambda: 12345)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert device_bytes(types.SimpleNamespace(device="gpu")) == 12345
    assert device_bytes(types.SimpleNamespace(device="gpu-emulated")) is None
    assert device_bytes(types.SimpleNamespace(device="cpu")) is None
