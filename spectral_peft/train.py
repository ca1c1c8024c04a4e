"""The training loop: one step in PEFT's order, metrics, checkpoints, exact resume, a NaN guard.

One step (``Trainer.train_step``), with ``t`` the number of steps already taken (0-based):

    controllers.before_forward(t)            DyLoRA draws its rank, RoSA picks its agenda
    out = model.forward(**batch)             loss from the batch's labels
    model.backward()                         gradients accumulate into grads (RoSA's collection waits)
    (N ranks) all-reduce                     g = Σ n_r g_r / Σ n_r, the loss likewise, RoSA's collected
                                             gradients, every rank's non-finite flag (distributed.py)
    loss += Σ controller.regularize()        AdaLoRA's orthogonal penalty (adds its own gradient)
    NaN guard                                a non-finite loss or gradient: raise, or skip the step
    clip_grad_norm(model, max_grad_norm)
    controllers.after_backward(t)            LoRA-FA corrects g_B (after clipping, as PEFT's optimizer)
    optimizer.step(); schedule.step()
    controllers.after_optimizer_step(t)      AdaLoRA allocates (update_and_allocate), Delta-LoRA moves
                                             W, DyLoRA and RoSA commit what this step drew/collected
    model.zero_grad()

A step the guard skips (nonfinite="skip") runs nothing after the guard: parameters, optimiser
state, schedule and every controller's state are left exactly as they were (its batch and its
dropout draws are consumed).

Data. :class:`~spectral_peft.batches.SeededBatches` draws the batch of step ``t`` from a generator seeded with
``(seed, t)`` alone, so a resumed run sees exactly the batches the uninterrupted run saw, with no
stream to fast-forward.

Checkpoints (:mod:`spectral_peft.io.checkpoint`) hold the parameters, the optimiser, schedule,
controllers and data states, every random generator of the model (dropout) and the trainer's
counters, so ``resume()`` + ``fit(batches, N + M)`` is bitwise the uninterrupted run.

Data parallelism (spectral_peft/distributed.py, docs/distributed.md). Under ``mpirun -n N`` the
batch a step receives is the GLOBAL batch: rank r trains on its rows r·B/N .. (r+1)·B/N − 1 and
the gradients are all-reduced right after the backward, before anything reads them, so every rank
then runs the one-process step on the one-process gradient (equal up to rounding; bitwise equal
across ranks). The NaN guard decides collectively: each rank flags its own loss and gradients
before the reduce; if any rank is bad, every rank skips (mode "skip") or every rank raises
NonFiniteError naming the bad ranks. The model's dropout streams are per rank (rank r > 0 draws a
stream of its own) and every rank's are saved in the checkpoint; a resume must use the same N.

Shape legend: B batch, T sequence; a batch is a dict of (B, T) int64 arrays (input_ids, labels,
attention_mask, token_type_ids) or (B,) labels, passed to ``model.forward`` as keywords.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping

import numpy as np

from tqdm.auto import tqdm

from . import distributed
from .backend import begin_step, end_step, get_xp, host_scalar, to_host
from .batches import SeededBatches  # noqa: F401 - part of this module's API (spectral_peft.train.SeededBatches)
from .io import checkpoint as ckpt_io
from .memory import memory_report
from .optim import clip_grad_norm

NONFINITE_MODES = ("raise", "skip")


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient. Attributes: ``step``, ``parameter`` (dotted name or None),
    ``layer`` (dotted path of the module owning it or None), ``loss``, ``checkpoint`` (the last
    good checkpoint, untouched, or None)."""

    def __init__(self, message: str, step: int, parameter: str | None, layer: str | None, loss: float,
                 checkpoint: str | None):
        super().__init__(message)
        self.step, self.parameter, self.layer, self.loss, self.checkpoint = step, parameter, layer, loss, checkpoint


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
def _has(obj, *methods) -> bool:
    return all(callable(getattr(obj, m, None)) for m in methods)


def _finite(a) -> bool:
    """All entries finite. A sum is one pass with no temporary; only when it is not finite (a NaN,
    an Inf, or an overflow of huge finite values) is the exact elementwise test run."""
    xp = get_xp(a)
    if a.size == 0 or host_scalar(xp.isfinite(a.sum()), "nan guard"):
        return True
    return host_scalar(xp.isfinite(a).all(), "nan guard")


def _all_finite(arrays) -> bool:
    """All entries of every array finite, read with one device-to-host sync: the sum of their sums
    is finite when they are (else, or on overflow, the exact per-array test of :func:`_finite`)."""
    arrays = [a for a in arrays if a.size]
    if not arrays:
        return True
    total = arrays[0].sum()
    for a in arrays[1:]:
        total = total + a.sum()
    return host_scalar(get_xp(total).isfinite(total), "nan guard") or all(_finite(a) for a in arrays)


def _scalars(state: Mapping) -> dict:
    """The plain (non-array) entries of a state_dict: hyperparameters and counters."""
    return {k: v for k, v in state.items() if isinstance(v, (bool, int, float, str, list, tuple, type(None)))}


class Trainer:
    """Runs training steps in PEFT's order (module docstring), with metrics and checkpoints.

    model:           a Module with forward(**batch) -> output with ``.loss`` and backward().
    optimizer:       step(), state_dict(), load_state_dict(); ``.lr`` is reported when present.
    schedule:        None or step(), state_dict(), load_state_dict().
    max_grad_norm:   None, or a finite float > 0: clip the global gradient norm to it.
    controllers:     None (use ``model.controllers`` when present) or a list of Controllers.
    checkpoint_dir:  where checkpoints go (None: no checkpoints).
    keep_last:       int >= 1, the checkpoints kept.
    checkpoint_every: None or int >= 1: write a checkpoint after every that many steps (needs
                     checkpoint_dir). ``fit`` also writes one when it ends.
    nonfinite:       "raise" (stop with NonFiniteError) or "skip" (drop the step's update).
    progress:        show a tqdm progress bar in ``fit`` (on stderr, rank 0 only), labelled ``progress_desc``.
    comm:            None (``distributed.world()``: one process without mpirun) or a Communicator.
    metrics_log:     None or an object with ``__call__(trainer, metrics) -> dict`` (extra fields
                     merged into each step's metrics) and ``close()`` (called when fit ends).
    """

    def __init__(self, model, optimizer, schedule=None, max_grad_norm=None, controllers=None,
                 checkpoint_dir=None, keep_last: int = 3, checkpoint_every: int | None = None,
                 nonfinite: str = "raise", progress: bool = False, progress_desc: str | None = None,
                 comm=None, metrics_log=None):
        if not _has(model, "forward", "backward", "named_parameters", "zero_grad"):
            raise TypeError(f"model must be a spectral_peft Module with forward/backward, got {type(model).__name__}")
        if not _has(optimizer, "step", "state_dict", "load_state_dict"):
            raise TypeError(f"optimizer must have step(), state_dict() and load_state_dict(), got "
                            f"{type(optimizer).__name__}")
        if schedule is not None and not _has(schedule, "step", "state_dict", "load_state_dict"):
            raise TypeError(f"schedule must be None or have step(), state_dict() and load_state_dict(), got "
                            f"{type(schedule).__name__}")
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) \
                    or not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
                raise ValueError(f"max_grad_norm must be None or a finite number > 0, got {max_grad_norm!r}")
        if controllers is None:
            controllers = list(getattr(model, "controllers", None) or [])
        if isinstance(controllers, (str, bytes)) or not isinstance(controllers, Iterable):
            raise TypeError(f"controllers must be None or a list of Controllers, got {type(controllers).__name__}")
        controllers = list(controllers)
        hooks = ("before_forward", "regularize", "after_backward", "after_optimizer_step", "state_dict",
                 "load_state_dict")
        for i, c in enumerate(controllers):
            if not _has(c, *hooks):
                raise TypeError(f"controllers[{i}] ({type(c).__name__}) lacks the Controller hooks {hooks}")
        if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be None or a path, got {type(checkpoint_dir).__name__}")
        if type(keep_last) is not int or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        if checkpoint_every is not None:
            if type(checkpoint_every) is not int or checkpoint_every < 1:
                raise ValueError(f"checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}")
            if checkpoint_dir is None:
                raise ValueError("checkpoint_every is set but checkpoint_dir is None; give a directory")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {progress!r}")
        self.clip = clip_grad_norm if max_grad_norm is not None else None
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.controllers = controllers
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.keep_last, self.checkpoint_every = keep_last, checkpoint_every
        self.nonfinite, self.progress, self.progress_desc = nonfinite, progress, progress_desc
        self.step = 0  # optimizer steps taken (skipped steps count: they consumed their batch)
        self.skipped: list[int] = []
        self.history: list[dict] = []
        self.eval_history: list[tuple[int, float]] = []  # (step, evaluate()) of fit's evaluations
        self.last_checkpoint: str | None = None
        self.data = None
        self._pending_data_state = None
        self.comm = distributed.world() if comm is None else comm
        self.metrics_log = metrics_log
        self.reducer = distributed.GradientReducer(self.comm) if self.comm.size > 1 else None
        self._checked = False  # the start-up digest comparison (first step under N ranks)
        if self.comm.size > 1:  # each rank its own dropout stream; DyLoRA's rank stream (a controller's) stays shared
            distributed.offset_streams(ckpt_io.collect_generators(model, ()), self.comm.rank)

    # --- one step ------------------------------------------------------------------------------
    def _lr(self):
        lr = getattr(self.optimizer, "lr", None)
        return float(lr) if isinstance(lr, (int, float, np.floating)) else None

    def train_step(self, batch: Mapping) -> dict:
        """One step on ``batch`` (keywords of model.forward; under N ranks the global batch, of
        which this rank trains its shard); returns its metrics: step, loss (data loss +
        regularisers), lr, ms, tokens (of the global batch), tokens_per_s, activation_bytes,
        skipped, d2h, h2d, ms_forward, ms_backward, ms_comm (0.0 on one process), ms_optimizer
        (guard, clipping, controllers, optimizer), world_size, rank, and the metrics_log's fields."""
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(f"batch must be a dict holding at least 'input_ids', got {type(batch).__name__}"
                             + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""))
        t = self.step
        model, backend, comm = self.model, getattr(self.model, "backend", None), self.comm
        mask = batch.get("attention_mask")
        tokens = int(to_host(mask).sum()) if mask is not None else int(np.size(batch["input_ids"]))  # global
        if comm.size > 1:
            if not self._checked:
                self._check_ranks(batch)
            batch = distributed.shard_batch(batch, comm)
        moved_before = begin_step(t)
        batch = batch_on_backend(batch, backend)  # the edge: host batches move to the model's device here
        lr = self._lr()
        t0 = time.perf_counter()
        model.train()
        for c in self.controllers:
            c.before_forward(t)
        out = model.forward(**batch)
        loss = getattr(out, "loss", None)
        if loss is None:
            raise ValueError("model.forward returned no loss: the batch needs 'labels'")
        loss = float(to_host(loss))
        activation_bytes = model.activation_bytes() if hasattr(model, "activation_bytes") else 0
        t_fwd = time.perf_counter()
        model.backward()
        t_bwd = time.perf_counter()
        ms_comm = 0.0
        if comm.size > 1:
            loss = self._reduce(t, batch, loss)
            ms_comm = self.reducer.last_ms
        t_comm = time.perf_counter()
        for c in self.controllers:
            loss += float(c.regularize())
        skipped = not self._guard(t, loss)
        if not skipped:
            if self.clip is not None:
                self.clip(model, self.max_grad_norm)
            for c in self.controllers:
                c.after_backward(t)
            self.optimizer.step()
            if self.schedule is not None:
                self.schedule.step()
            for c in self.controllers:
                c.after_optimizer_step(t)
        else:
            self.skipped.append(t)
            if hasattr(model, "clear_cache"):
                model.clear_cache()
        model.zero_grad()
        t1 = time.perf_counter()
        ms = 1e3 * (t1 - t0)
        self.step = t + 1
        moved = end_step(moved_before)  # device-to-host syncs and host-to-device copies this step
        metrics = {"step": self.step, "loss": loss, "lr": lr, "ms": ms, "tokens": tokens,
                   "d2h": moved["d2h"], "h2d": moved["h2d"], "transfers": moved["by_name"],
                   "tokens_per_s": tokens / (ms / 1e3) if ms > 0 else float("inf"),
                   "activation_bytes": int(activation_bytes), "skipped": skipped,
                   "ms_forward": 1e3 * (t_fwd - t0), "ms_backward": 1e3 * (t_bwd - t_fwd), "ms_comm": ms_comm,
                   "ms_optimizer": 1e3 * (t1 - t_comm), "world_size": comm.size, "rank": comm.rank}
        if self.metrics_log is not None:
            metrics.update(self.metrics_log(self, metrics))
        self.history.append(metrics)
        return metrics

    def _check_ranks(self, batch: Mapping) -> None:
        """Start-up checks under N ranks, before the first step's work: N divides the global batch,
        and every rank holds the same model, optimiser and settings (a digest compared across ranks)."""
        distributed.check_divisible(self.comm, int(np.shape(batch["input_ids"])[0]))
        fields = {"step": self.step, "optimizer": type(self.optimizer).__name__, "lr": self._lr(),
                  "optimizer settings": _scalars(self.optimizer.state_dict()),
                  "schedule": None if self.schedule is None else _scalars(self.schedule.state_dict()),
                  "max_grad_norm": self.max_grad_norm, "nonfinite": self.nonfinite,
                  "controllers": [type(c).__name__ for c in self.controllers],
                  "batch": {k: [list(np.shape(v)), str(getattr(v, "dtype", type(v).__name__))]
                            for k, v in sorted(batch.items())}}
        sums = []
        for name, m, k in self.model.named_parameters():
            p = m.params[k]
            sums.append((name, list(p.shape), str(p.dtype), k in m.frozen))
        values = [m.params[k] for _, m, k in self.model.named_parameters()]
        # the values, read as two moments per parameter (sum and sum of squares)
        moments = [float(to_host(v.sum())) for v in values] + [float(to_host((v * v).sum())) for v in values]
        fields["parameters"] = distributed.digest(sums)
        fields["parameter values"] = distributed.digest([repr(x) for x in moments])
        distributed.check_same(self.comm, "the Trainer's model or settings", fields)
        self._checked = True

    def _reduce(self, t: int, batch: Mapping, loss: float) -> float:
        """All-reduce this rank's gradients (and RoSA's collected ones) into the one-process
        gradient, before regularize(); returns the global data loss Σ n_r L_r / Σ n_r. Each rank
        flags its own non-finite loss or gradients first; any flag: every rank skips the step
        (mode "skip", returning a NaN loss that the guard then skips on) or raises naming the ranks."""
        trainable = [m.grads[k] for _, m, k in self.model.named_parameters(trainable_only=True)
                     if m.grads.get(k) is not None]
        stats = [a for c in self.controllers for a in (getattr(c, "gradient_statistics", list)() or [])]
        bad = not (math.isfinite(loss) and _all_finite(trainable))
        detail = self._nonfinite_detail(loss) if bad else None
        _, loss, bad_ranks = self.reducer.reduce_(trainable + stats, float(target_count(batch)), loss, bad)
        if not bad_ranks:
            return loss
        if self.nonfinite == "skip":
            return math.nan
        details = self.comm.allgather(detail)  # what each bad rank found, for every rank's message
        self.model.zero_grad()
        if hasattr(self.model, "clear_cache"):
            self.model.clear_cache()
        where = (f"the last good checkpoint {self.last_checkpoint!r} is intact" if self.last_checkpoint
                 else "no checkpoint was written")
        said = "; ".join(f"rank {r}: {details[r][2]}" for r in bad_ranks if details[r] is not None)
        first = next((details[r] for r in bad_ranks if details[r] is not None), (None, None, "", loss))
        raise NonFiniteError(f"non-finite values at step {t} (0-based) on rank{'s' if len(bad_ranks) > 1 else ''} "
                             f"{', '.join(map(str, bad_ranks))} of {self.comm.size}: {said}. No update was applied "
                             f"on any rank and {where}. Lower the learning rate, set max_grad_norm, or pass "
                             "nonfinite='skip'.", t, first[0], first[1], first[3], self.last_checkpoint)

    def _nonfinite_detail(self, loss: float):
        """(parameter, layer, what is wrong, loss) for a non-finite loss or gradient (the first bad
        gradient in model order), or None when all are finite."""
        bad_name = bad_layer = None
        detail = ""
        for name, m, k in self.model.named_parameters(trainable_only=True):
            g = m.grads.get(k)
            if g is not None and not _finite(g):
                xp = get_xp(g)
                n_nan, n_inf = int(xp.isnan(g).sum()), int(xp.isinf(g).sum())
                bad_name, bad_layer = name, name[: -len(k) - 1] if name != k else ""
                detail = (f"the gradient of parameter {name!r} (layer {bad_layer!r}, {type(m).__name__}) holds "
                          f"{n_nan} NaN and {n_inf} Inf of {g.size} entries")
                break
        if bad_name is None and math.isfinite(loss):
            return None
        if bad_name is None:
            detail = f"the loss is {loss} while every gradient is finite"
        for name, m, k in self.model.named_parameters():  # diagnosis only: which weight went bad?
            if not _finite(m.params[k]):
                detail += f"; parameter {name!r} itself holds non-finite values"
                if bad_name is None:
                    bad_name, bad_layer = name, name[: -len(k) - 1] if name != k else ""
                break
        return bad_name, bad_layer, detail, loss

    def _guard(self, t: int, loss: float) -> bool:
        """True when the loss and every gradient are finite. Otherwise raise NonFiniteError naming
        the step, the parameter and its layer (mode "raise"), or return False (mode "skip")."""
        trainable = list(self.model.named_parameters(trainable_only=True))
        if math.isfinite(loss) and _all_finite([m.grads[k] for _, m, k in trainable if m.grads.get(k) is not None]):
            return True
        found = self._nonfinite_detail(loss)
        if found is None:
            return True
        if self.nonfinite == "skip":
            return False
        bad_name, bad_layer, detail, _ = found
        self.model.zero_grad()
        if hasattr(self.model, "clear_cache"):
            self.model.clear_cache()
        where = (f"the last good checkpoint {self.last_checkpoint!r} is intact" if self.last_checkpoint
                 else "no checkpoint was written")
        raise NonFiniteError(f"non-finite values at step {t} (0-based; loss {loss}): {detail}. "
                             f"No update was applied and {where}. Lower the learning rate, set max_grad_norm, "
                             "or pass nonfinite='skip'.", t, bad_name, bad_layer, loss, self.last_checkpoint)

    # --- loops ---------------------------------------------------------------------------------
    def _attach(self, batches):
        self.data = batches if _has(batches, "state_dict", "load_state_dict") else None
        if self._pending_data_state is not None:
            if self.data is None:
                raise ValueError("the checkpoint holds a data position but the batches given to fit() cannot "
                                 "restore one; pass a SeededBatches (or any source with load_state_dict)")
            self.data.load_state_dict(self._pending_data_state)
            self._pending_data_state = None

    def fit(self, batches, steps: int, callback=None, eval_batches=None, eval_every: int | None = None) -> list[dict]:
        """Train until ``self.step == steps`` (a TOTAL count: after resuming at step N,
        ``fit(batches, N + M)`` runs M more). ``batches``: a SeededBatches (the batch of step t is
        ``batches.batch(t)``, resumable) or any iterable of batch dicts (consumed in order, not
        resumable). Checkpoints every ``checkpoint_every`` steps and at the end. ``callback``, when
        given, is called with each step's metrics. With ``eval_batches`` (a list of batch dicts),
        :meth:`evaluate` runs before the first step, after every ``eval_every`` steps (None: only
        at the ends) and after the last step, each result appended to ``eval_history`` as
        (step, loss). Returns the metrics of the steps run."""
        if eval_every is not None and (type(eval_every) is not int or eval_every < 1):
            raise ValueError(f"eval_every must be None or an int >= 1, got {eval_every!r}")
        if type(steps) is not int or steps < 0:
            raise ValueError(f"steps must be an int >= 0 (the total step count), got {steps!r}")
        if steps < self.step:
            raise ValueError(f"steps = {steps} is below the {self.step} steps already taken; fit() counts "
                             "steps in total, so ask for at least that many")
        self._attach(batches)
        seeded = _has(batches, "batch")
        it = None if seeded else iter(batches)
        bar = None
        if self.progress and self.comm.is_main:
            bar = tqdm(total=steps, initial=self.step, unit="step", desc=self.progress_desc, leave=False)
        if eval_batches is not None and not any(s == self.step for s, _ in self.eval_history):
            self.eval_history.append((self.step, self.evaluate(eval_batches)))
        out = []
        try:
            while self.step < steps:
                if seeded:
                    batch = batches.batch(self.step)
                    batches.position = self.step + 1
                else:
                    try:
                        batch = next(it)
                    except StopIteration:
                        raise ValueError(f"batches ran out after step {self.step} of {steps}") from None
                m = self.train_step(batch)
                out.append(m)
                if callback is not None:
                    callback(m)
                if eval_batches is not None and eval_every is not None and self.step % eval_every == 0:
                    self.eval_history.append((self.step, self.evaluate(eval_batches)))
                if bar is not None:
                    bar.update(1)
                    shown = {"loss": f"{m['loss']:.4f}", "ms": f"{m['ms']:.0f}", "tok_s": f"{m['tokens_per_s']:.0f}"}
                    if self.comm.size > 1:
                        shown["comm_ms"] = f"{m['ms_comm']:.2f}"
                    if "peak_rss_bytes" in m:  # a metrics_log's field
                        shown["rss_MiB"] = f"{m['peak_rss_bytes'] / 2**20:.0f}"
                    bar.set_postfix(shown)
                if self.checkpoint_every is not None and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                if any(getattr(c, "should_stop", False) for c in self.controllers):
                    break  # RoSA's terminate_after_mask_generation
        finally:
            if bar is not None:
                bar.close()
            if self.metrics_log is not None:
                self.metrics_log.close()
        if eval_batches is not None and self.eval_history[-1][0] != self.step:
            self.eval_history.append((self.step, self.evaluate(eval_batches)))
        if self.checkpoint_dir is not None and out and self.last_checkpoint != os.path.join(
                self.checkpoint_dir, ckpt_io.step_dir_name(self.step)):
            self.save_checkpoint()
        return out

    def evaluate(self, batches: Iterable) -> float:
        """:func:`evaluate` of the trainer's model, sharded over the trainer's ranks."""
        return evaluate(self.model, batches, comm=self.comm)

    # --- metrics -------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """Summary of the steps run so far: median ms/step, tokens/s, peak activation bytes, and
        spectral_peft.memory.memory_report(model, optimizer)."""
        ran = [h for h in self.history if not h["skipped"]] or self.history
        ms = float(np.median([h["ms"] for h in ran])) if ran else float("nan")
        tok = sum(h["tokens"] for h in ran)
        secs = sum(h["ms"] for h in ran) / 1e3
        out = {"steps": self.step, "skipped": list(self.skipped), "ms_per_step": ms,
               "tokens_per_s": tok / secs if secs > 0 else float("nan"),
               "peak_activation_bytes": max((h["activation_bytes"] for h in ran), default=0)}
        out["memory"] = memory_report(self.model, self.optimizer)
        return out

    # --- checkpoints ---------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        state = {"step": self.step, "skipped": list(self.skipped)}
        if self.comm.size > 1:  # every rank's dropout streams (rank 0's are the checkpoint's own generators)
            gens = {k: g.bit_generator.state for k, g in ckpt_io.collect_generators(self.model, ()).items()}
            state["world_size"] = self.comm.size
            state["rank_generators"] = self.comm.allgather(gens)[1:]
        return state

    def save_checkpoint(self) -> str:
        """Write a checkpoint of the current step (atomic; keeps the newest ``keep_last``). Under N
        ranks every rank calls it: the ranks' generator states are gathered, rank 0 writes, the
        others wait for its path."""
        if self.checkpoint_dir is None:
            raise ValueError("save_checkpoint: checkpoint_dir is None; give the Trainer a directory")
        state = self._trainer_state()
        path = None
        if self.comm.is_main:
            path = ckpt_io.save_checkpoint(
                self.checkpoint_dir, self.step, self.model, self.optimizer, self.schedule, self.controllers,
                data=self.data, trainer_state=state, keep_last=self.keep_last)
        self.last_checkpoint = self.comm.bcast(path, root=0)
        return self.last_checkpoint

    def resume(self, path=None) -> int:
        """Load the checkpoint ``path`` (default: the newest complete one in checkpoint_dir) into
        the model, optimiser, schedule, controllers and generators; returns the step reached
        (0, with nothing loaded, when checkpoint_dir holds no checkpoint). The data position is
        applied to the batches passed to the next ``fit``. Leftovers of interrupted writes are
        removed. Raises FileFormatError, naming the file and key, for a damaged checkpoint. Under
        N ranks every rank calls it (rank 0 cleans and picks the checkpoint, every rank reads it);
        a checkpoint written by another number of ranks is refused."""
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("resume: give a checkpoint path or a Trainer checkpoint_dir")
            if self.comm.is_main:
                ckpt_io.clean_partial(self.checkpoint_dir)
                path = ckpt_io.latest_checkpoint(self.checkpoint_dir)
            path = self.comm.bcast(path, root=0)
            if path is None:
                return 0
        ckpt = ckpt_io.read_checkpoint(path)
        trainer = ckpt.states["trainer"]
        step = trainer.get("step") if isinstance(trainer, dict) else None
        skipped = trainer.get("skipped", []) if isinstance(trainer, dict) else None
        if step != ckpt.step or not isinstance(skipped, list) or not all(type(s) is int for s in skipped):
            raise ckpt_io.FileFormatError(os.path.join(path, ckpt_io.MANIFEST_FILE),
                                          f"trainer state {trainer!r:.80} does not match the checkpoint step "
                                          f"{ckpt.step}", key="states.trainer")
        saved_n = trainer.get("world_size", 1)
        if saved_n != self.comm.size:
            raise distributed.LaunchError(
                f"checkpoint {os.fspath(path)!r} was written by a run on {saved_n} rank{'s' if saved_n != 1 else ''}; "
                f"this run has {self.comm.size}: resume with mpirun -n {saved_n} (each rank's shard and dropout "
                "stream are part of the state)")
        data_state = ckpt.states["data"]  # applied to the batches that fit() receives
        ckpt_io.load_checkpoint(ckpt, self.model, self.optimizer, self.schedule, self.controllers,
                                data=_StateHolder(data_state) if data_state is not None else None)
        if self.comm.rank > 0:  # this rank's own dropout streams
            mine = trainer["rank_generators"][self.comm.rank - 1]
            for key, g in ckpt_io.collect_generators(self.model, ()).items():
                g.bit_generator.state = mine[key]
        self.step = ckpt.step
        self.skipped = list(skipped)
        self._pending_data_state = data_state
        self.last_checkpoint = os.fspath(path)
        return self.step


def batch_on_backend(batch: Mapping, backend) -> dict:
    """A batch dict with its host arrays moved to ``backend`` (None: left as they are)."""
    if backend is None:
        return dict(batch)
    return {k: backend.asarray(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def evaluate(model, batches: Iterable, comm=None) -> float:
    """The mean loss over every target of ``batches`` (an iterable of batch dicts), in eval
    mode (no dropout), no gradients kept; training mode is restored afterwards. Each batch's
    mean loss is weighted by its number of targets (:func:`target_count`), so the result is
    the mean over all targets whatever the batch sizes. ``comm`` (None: ``distributed.world()``):
    under N ranks rank r evaluates batches r, r + N, ... and the totals are summed over the ranks
    (every rank returns the same value; equal to one process up to the order of the sum)."""
    comm = distributed.world() if comm is None else comm
    total, n = 0.0, 0
    model.eval()
    try:
        backend = getattr(model, "backend", None)
        for i, batch in enumerate(batches):
            if i % comm.size != comm.rank:
                continue
            batch = batch_on_backend(batch, backend)
            out = model.forward(**batch)
            if getattr(out, "loss", None) is None:
                raise ValueError("evaluate: model.forward returned no loss; the batches need 'labels'")
            w = target_count(batch)
            total += float(to_host(out.loss)) * w
            n += w
            if hasattr(model, "clear_cache"):
                model.clear_cache()
    finally:
        model.train()
    if comm.size > 1:
        total, n = (float(v) for v in comm.allreduce_sum(np.array([total, n], dtype=np.float64)))
    if n == 0:
        raise ValueError("evaluate: the batches hold no targets (empty, or every label is -100)")
    return total / n


def target_count(batch: Mapping) -> int:
    """The targets a batch's mean loss averages over: for labels (B, T) of a language model, the
    shifted positions whose label is not -100; for labels (B,) of a classifier, B."""
    labels = to_host(batch["labels"])
    if labels.ndim == 1:
        return int(labels.shape[0])
    return int((labels[:, 1:] != -100).sum())


class _StateHolder:
    """Stands in for the data source during load_checkpoint (the real one arrives with fit())."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


__all__ = ["Trainer", "SeededBatches", "NonFiniteError", "NONFINITE_MODES", "evaluate", "target_count"]
