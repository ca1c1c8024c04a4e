"""Data-parallel training (spectral_peft/distributed.py): ``mpirun -n 2`` equals one process.

Each test that needs MPI launches ``mpirun -n 2`` itself (tests/_dist_worker.py) with a timeout;
the one-process side of every comparison is the same worker code run in this process. Tolerances:
losses within 1e-9 relative, parameters within 1e-9 absolute (float64: the two sides differ only in
the order of the sum over the batch's rows, a few ulps); patterns, supports and resumed runs exactly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_dist_worker.py")
sys.path.insert(0, HERE)

MPIRUN = shutil.which("mpirun")
try:
    import mpi4py  # noqa: F401
    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False
needs_mpi = pytest.mark.skipif(MPIRUN is None or not HAVE_MPI4PY,
                               reason="needs mpirun and mpi4py: pip install -e '.[distributed]'")


def mpirun(mode: str, out, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", "2"]
    for k in (env or {}):
        cmd += ["-x", k]
    cmd += [sys.executable, WORKER, mode, str(out)]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


@needs_mpi
def test_two_ranks_equal_one_process_for_every_method(tmp_path):
    """One launch trains every method of the registry on 2 ranks; the same runs in this process
    give the same losses, parameters, AdaLoRA rank patterns and RoSA supports."""
    import _dist_worker as w

    from spectral_peft import distributed
    from spectral_peft.adapters.registry import METHODS

    proc = mpirun("all", tmp_path / "two", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folder = w.base_folder(str(tmp_path / "one"), distributed.SINGLE)
    for name in METHODS:
        trainer, model, batches = w.train_one(name, folder, distributed.SINGLE)
        arrays, meta = w.record(name, trainer, model, batches)
        with open(tmp_path / "two" / f"{name}.json") as f:
            two = json.load(f)
        assert two["world_size"] == 2 and all(ms > 0 for ms in two["ms_comm"]), name
        assert two["tokens"] == meta["tokens"] == [w.BATCH * batches.seq_len] * w.STEPS  # global tokens
        assert {"ms_forward", "ms_backward", "ms_optimizer", "ms_comm", "world_size", "rank"} <= set(two["keys"])
        assert all(h["ms_comm"] == 0.0 and h["world_size"] == 1 for h in trainer.history)
        np.testing.assert_allclose(two["losses"], meta["losses"], rtol=1e-9, atol=0, err_msg=name)
        np.testing.assert_allclose(two["eval"], meta["eval"], rtol=1e-9, atol=0, err_msg=name)
        assert two.get("rank_pattern") == meta.get("rank_pattern"), name
        assert two.get("supports") == meta.get("supports"), name
        with np.load(tmp_path / "two" / f"{name}.npz") as p2:
            assert sorted(p2.files) == sorted(arrays), name
            for k, v in arrays.items():
                np.testing.assert_allclose(p2[k], v, rtol=0, atol=1e-9, err_msg=f"{name}: {k}")
    # the checks bite: AdaLoRA pruned some triplets, RoSA chose supports
    with open(tmp_path / "two" / "adalora.json") as f:
        pattern = json.load(f)["rank_pattern"]
    assert pattern and not all(all(v) for v in pattern.values())
    with open(tmp_path / "two" / "rosa.json") as f:
        assert json.load(f)["supports"]


@needs_mpi
def test_killed_rank_stops_the_job_and_resume_is_bitwise(tmp_path):
    """Rank 1 SIGKILLs itself at step 5: mpirun exits non-zero within the timeout, naming rank 1.
    Resuming from the last checkpoint (step 4) on 2 ranks gives exactly the losses and parameters
    of an uninterrupted 2-rank run (dropout 0.1: every rank's stream comes back)."""
    whole = mpirun("resume", tmp_path / "whole")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    killed = mpirun("resume", tmp_path / "cut", env={"DIST_KILL_STEP": "5", "DIST_KILL_RANK": "1"})
    assert killed.returncode != 0
    assert "rank 1" in killed.stdout + killed.stderr
    assert sorted(os.listdir(tmp_path / "cut" / "ckpt")) == ["step-00000002", "step-00000004"]
    resumed = mpirun("resume", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    with open(tmp_path / "whole" / "losses-0.json") as f:
        a = json.load(f)
    with open(tmp_path / "cut" / "losses-4.json") as f:
        b = json.load(f)
    assert b["start"] == 4 and len(b["losses"]) == 6
    assert b["losses"] == a["losses"][4:]  # float.hex: bitwise
    assert b["params"] == a["params"]
    # resuming that 2-rank checkpoint in one process is refused
    one = subprocess.run([sys.executable, WORKER, "resume", str(tmp_path / "cut")], capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI"))})
    assert one.returncode != 0 and "written by a run on 2 ranks; this run has 1" in one.stderr


@needs_mpi
def test_batch_not_divisible_by_ranks_is_refused_on_every_rank(tmp_path):
    proc = mpirun("bad_batch", tmp_path)
    assert proc.returncode != 0
    assert "the global batch of 3 rows does not split over 2 ranks" in proc.stderr
    assert proc.stderr.count("does not split") == 1  # said once, by rank 0


@needs_mpi
def test_mismatched_configs_are_named(tmp_path):
    proc = mpirun("mismatch", tmp_path)
    assert proc.returncode != 0
    assert "rank 1 has schedule.base_lr = 0.002 where rank 0 has 0.001" in proc.stderr


def test_no_mpi_import_without_a_launcher(tmp_path):
    """Without mpirun, importing the package, training and `spectral-peft run` never import mpi4py,
    and world() is the one-process communicator."""
    code = ("import sys; sys.path.insert(0, %r); import _dist_worker as w; import spectral_peft;"
            "from spectral_peft import distributed; c = distributed.world(); assert c is distributed.SINGLE;"
            "w.train_one('lora', w.base_folder(%r, c), c, steps=2); t, _, _ = w.train_one('rosa', w.base_folder(%r, c),"
            " None, steps=2); assert t.comm is distributed.SINGLE;"
            "from spectral_peft import cli; assert cli.main(['run', '--quick', '--methods', 'lora', '--out', %r,"
            " '--cache_dir', %r, '--figures', 'false', '--progress', 'false']) == 0;"
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; print('ok')") % (
                HERE, str(tmp_path), str(tmp_path), str(tmp_path / "runs"), str(tmp_path / "cache"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=os.path.dirname(HERE))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


class _Fake:
    """A Communicator of size N that sums nothing: what rank ``rank`` sends comes back times N
    (as if every rank held the same values), for the reducer's arithmetic without MPI."""

    def __init__(self, rank, size):
        self.rank, self.size, self.is_main = rank, size, rank == 0

    def allreduce_(self, a):
        a *= self.size
        return a

    def allgather(self, obj):
        return [obj] * self.size


def test_reducer_divides_by_the_total_count_and_reports_bad_ranks():
    """Hand-computed: with every rank holding g and n = 3, Σ n g / Σ n = g; the loss comes back;
    rank 1's flag names rank 1 (the fake sums N copies of rank 1's own flag: slot 1)."""
    from spectral_peft.distributed import GradientReducer

    g1, g2 = np.array([[1.0, -2.0]]), np.array([0.5, 4.0, 8.0])
    red = GradientReducer(_Fake(1, 2), bucket_bytes=16)  # 16 bytes: g1 and g2 in separate buckets
    total, loss, bad = red.reduce_([g1, g2], 3.0, 0.25, bad=False)
    assert (total, loss, bad) == (6.0, 0.25, [])
    assert len(red._buckets) == 2
    np.testing.assert_array_equal(g1, [[1.0, -2.0]])
    np.testing.assert_array_equal(g2, [0.5, 4.0, 8.0])
    _, _, bad = red.reduce_([g1, g2], 3.0, 0.25, bad=True)
    assert bad == [1]


@needs_mpi
def test_reducer_over_mpi_in_several_buckets(tmp_path):
    """Rank r holds g_r = (r+1)·g with n_r = r + 1 and L_r = 0.5 + r; by hand, with n = (1, 2):
    Σ n_r g_r / Σ n_r = (1·1 + 2·2)/3 · g = 5/3 · g, the loss (1·0.5 + 2·1.5)/3 = 7/6, and rank 1
    flagged. Buckets of at most 64 bytes: the float32 array (20 bytes), then the (5, 2) float64 one
    (80 bytes, alone), then the last float64 array with the counts and flags."""
    proc = mpirun("buckets", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for r in (0, 1):
        with open(tmp_path / f"buckets-{r}.json") as f:
            res = json.load(f)
        assert res["total"] == 3.0 and res["bad"] == [1] and res["buckets"] == 3
        np.testing.assert_allclose(res["loss"], 7 / 6, rtol=1e-15)
        assert res["dtypes"] == ["float64", "float32", "float64"]
        np.testing.assert_allclose(res["arrays"][0], np.full((5, 2), 5 / 3), rtol=1e-15)
        np.testing.assert_allclose(res["arrays"][1], np.arange(5) * 5 / 3, rtol=1e-6)  # float32
        np.testing.assert_allclose(res["arrays"][2], [(0 * 1 + 10 * 2) / 3], rtol=1e-15)


def test_shard_and_divisibility():
    from spectral_peft.distributed import LaunchError, shard_batch

    batch = {"input_ids": np.arange(12).reshape(4, 3), "labels": np.arange(4), "other": 7}
    s = shard_batch(batch, _Fake(1, 2))
    np.testing.assert_array_equal(s["input_ids"], [[6, 7, 8], [9, 10, 11]])
    np.testing.assert_array_equal(s["labels"], [2, 3])
    assert s["other"] == 7
    with pytest.raises(LaunchError, match="the global batch of 4 rows does not split over 3 ranks"):
        shard_batch(batch, _Fake(0, 3))


def test_nccl_reducer_construction(monkeypatch):
    """Without a GPU: rank 0 draws the unique id, the others receive it through the MPI broadcast,
    and each joins the clique as (size, id, rank); a CuPy without NCCL is refused with the fix."""
    cupy = pytest.importorskip("cupy")
    import types

    from spectral_peft import distributed

    made, drawn = [], []
    fake = types.SimpleNamespace(available=True, get_unique_id=lambda: drawn.append(1) or ("uid",),
                                 NcclCommunicator=lambda n, uid, rank: made.append((n, uid, rank)) or "clique")
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", fake)
    monkeypatch.setattr(cupy.cuda, "nccl", fake, raising=False)

    class Rank(distributed.Communicator):
        def __init__(self, rank):
            self.rank, self.size = rank, 2

        def bcast(self, obj, root=0):
            return ("uid",) if self.rank != root else obj

    assert distributed.NcclReducer(Rank(0)).comm == "clique" and distributed.NcclReducer(Rank(1)).comm == "clique"
    assert drawn == [1] and made == [(2, ("uid",), 0), (2, ("uid",), 1)]
    fake.available = False
    with pytest.raises(RuntimeError, match="needs NCCL, which this CuPy cannot load"):
        distributed.NcclReducer(Rank(0))


def test_nccl_reducer_needs_a_gpu():
    cupy = pytest.importorskip("cupy")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        n = 0
    if n == 0:
        pytest.skip("NCCL all-reduce: CuPy is installed but sees no CUDA device")
    from spectral_peft import distributed

    class One(distributed.Communicator):  # a 1-rank MPI stand-in: bcast is the identity
        pass

    red = distributed.NcclReducer(One())
    a = cupy.arange(5, dtype=cupy.float64)
    red.allreduce_(a)  # one rank: the sum is the array itself, reduced on the device
    np.testing.assert_array_equal(cupy.asnumpy(a), np.arange(5.0))


def _cli(tmp_path, *flags, timeout=90):
    """``mpirun -n 2 python -m spectral_peft run --quick --methods lora,rosa`` from this checkout."""
    root = os.path.dirname(HERE)
    env = {**os.environ, "PYTHONPATH": root, "SPECTRAL_PEFT_CACHE": str(tmp_path / "cache")}
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x", "PYTHONPATH", "-x", "SPECTRAL_PEFT_CACHE",
           sys.executable, "-m", "spectral_peft", "run", "--quick", "--methods", "lora,rosa", "--out",
           str(tmp_path / "runs"), "--progress", "false", "--figures", "false", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)


@needs_mpi
def test_cli_run_on_two_ranks_prints_once_and_records_the_ranks(tmp_path):
    proc = _cli(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("trainable params") == 1  # the table, printed by rank 0 only
    assert "data parallel over 2 ranks (global batch 4)" in proc.stdout
    assert re.search(r"data parallel over 2 ranks; ms/step by rank \(all-reduce ms/step\): lora [\d.]+ / [\d.]+ "
                     r"\(all-reduce [\d.]+\); rosa", proc.stdout), proc.stdout
    assert len([p for p in os.listdir(tmp_path / "runs") if p != "latest"]) == 1  # one run folder, rank 0's
    with open(tmp_path / "runs" / "latest" / "results.json") as f:
        results = json.load(f)
    assert results["world_size"] == 2
    for m in results["methods"]:
        assert m["world_size"] == 2 and len(m["timing"]["ms_per_step_by_rank"]) == 2
        assert m["timing"]["ms_comm_per_step"] > 0


@needs_mpi
def test_cli_batch_not_divisible_is_one_line_and_every_rank_fails(tmp_path):
    proc = _cli(tmp_path, "--batch_size", "3")
    assert proc.returncode == 2
    assert proc.stderr.count("spectral-peft run: error: --batch_size 3: the global batch of 3 rows does not split "
                             "over 2 ranks") == 1
    assert not (tmp_path / "runs").exists()


@needs_mpi
@pytest.mark.parametrize("mode", ["nan_skip", "nan_raise"])
def test_nan_guard_decides_for_every_rank(tmp_path, mode):
    """Only rank 1's gradient is NaN at step 2: with "skip" both ranks skip step 2 and stay equal;
    with "raise" both raise, naming rank 1 and its parameter, with no update applied."""
    proc = mpirun(mode, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = []
    for r in (0, 1):
        with open(tmp_path / f"{mode}-{r}.json") as f:
            ranks.append(json.load(f))
    assert ranks[0]["params"] == ranks[1]["params"]
    if mode == "nan_skip":
        assert ranks[0]["skipped"] == ranks[1]["skipped"] == [2] and "error" not in ranks[0]
    else:
        for res in ranks:
            assert res["step"] == 2 and res["skipped"] == []
            assert "non-finite values at step 2 (0-based) on rank 1 of 2: rank 1: the gradient of parameter " \
                   "'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight'" in res["error"]
            assert res["parameter"] == "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"


def test_step_metrics_and_the_metrics_log_hook(tmp_path):
    """One process: the contract's metric keys (ms_comm 0.0, world_size 1, rank 0), the
    metrics_log's fields merged into each step's metrics, and its close() when fit ends."""
    import _dist_worker as w

    from spectral_peft import distributed

    class Log:
        def __init__(self):
            self.seen, self.closed = [], 0

        def __call__(self, trainer, metrics):
            self.seen.append(metrics["step"])
            return {"extra": 10 * metrics["step"]}

        def close(self):
            self.closed += 1

    log = Log()
    trainer, _, _ = w.train_one("lora", w.base_folder(str(tmp_path), distributed.SINGLE), None, steps=3,
                                metrics_log=log)
    assert log.seen == [1, 2, 3] and log.closed == 1
    keys = {"step", "loss", "lr", "ms", "tokens", "tokens_per_s", "activation_bytes", "skipped", "d2h", "h2d",
            "ms_forward", "ms_backward", "ms_optimizer", "ms_comm", "world_size", "rank", "extra"}
    for h in trainer.history:
        assert keys <= set(h)
        assert (h["ms_comm"], h["world_size"], h["rank"], h["extra"]) == (0.0, 1, 0, 10 * h["step"])
        assert h["tokens"] == w.BATCH * 16
        assert h["ms_forward"] + h["ms_backward"] + h["ms_optimizer"] <= h["ms"] + 1e-6
