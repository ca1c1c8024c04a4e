"""The results file of a run (``results.json``): its schema, and loading and saving it.

``spectral-peft run`` writes one results file per run folder; ``spectral-peft figures`` reads it
back and regenerates every figure from it alone, so everything a figure needs is in the file.

Schema (version 1), JSON:

    schema            "spectral_peft.results"
    version           1
    created           ISO-8601 UTC time the run started
    config            the run's options (flag name -> value), enough to repeat it
    data              {pretrain, finetune_train, finetune_eval}: data.Corpus.summary() of each,
                      plus "tokenizer"
    base_model        {config: the base's config.json fields and arch, params, pretrain: {steps, seconds, final_loss,
                      cached, cache_path}, eval_loss: the base model's loss on the fine-tuning eval
                      split before any fine-tuning}
    budget            {target: trainable parameters every PEFT method is matched to, tolerance}
    methods           a list of MethodResult dicts (below), in run order
    unavailable       a list of {method, reason} for methods that could not run
    timing            {data_s, pretrain_s, methods_s: {method: seconds}, figures_s, total_s}
    figures           file names of the figures written next to the results
    world_size        the number of ranks the run was launched on (1: one process; absent in files of
                      runs that predate data parallelism)

MethodResult:
    method                 "full", "lora", "rslora", "dora", "dylora", "lorafa", "deltalora",
                           "adalora", "rosa", "qlora", "qrosa"
    settings               the method's configuration (PEFT field names)
    trainable_params       int, counted from the model after training
    frozen_weight_bytes    int, bytes of every frozen parameter (packed codes and statistics for
                           a 4-bit base)
    peak_activation_bytes  int, the largest activation_bytes() seen right after a forward
    ms_per_step            float, median wall time of a training step
    final_eval_loss        float, mean cross-entropy (nats/byte) on the eval split after training
    train_curve            {step: [...], loss: [...], d2h: [...], h2d: [...]}: training loss,
                           device-to-host syncs and host-to-device copies per step
    eval_curve             {step: [...], loss: [...]}: eval loss at the evaluation points
    extras                 method-specific records for figures: the singular values of every
                           layer's ΔW, and the method controller's report() (AdaLoRA's ranks and
                           budget schedule, RoSA's densities and support, DyLoRA's loss by rank)
    world_size             the ranks it trained on (optional, as the next: absent in older files)
    timing                 {ms_per_step_by_rank: each rank's median ms/step, ms_comm_per_step: the
                           median all-reduce ms per step}
"""
from __future__ import annotations

import json
import math
import os

from .io.safe import atomic_write_bytes

SCHEMA = "spectral_peft.results"
VERSION = 1
RESULTS_FILE = "results.json"

TOP_LEVEL_FIELDS = ("schema", "version", "created", "config", "data", "base_model", "budget", "methods",
                    "unavailable", "timing", "figures")
METHOD_FIELDS = ("method", "settings", "trainable_params", "frozen_weight_bytes", "peak_activation_bytes",
                 "ms_per_step", "final_eval_loss", "train_curve", "eval_curve", "extras")


def new_results(created: str, config: dict) -> dict:
    """An empty results dict of the current schema."""
    return {
        "schema": SCHEMA, "version": VERSION, "created": created, "config": dict(config),
        "data": {}, "base_model": {}, "budget": {}, "methods": [], "unavailable": [],
        "timing": {}, "figures": [],
    }


def validate_results(results: dict, source: str = "results") -> None:
    """Raise ValueError naming the first field that is missing or wrong."""
    if not isinstance(results, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(results).__name__}")
    if results.get("schema") != SCHEMA:
        raise ValueError(f"{source}: field 'schema' is {results.get('schema')!r}; expected {SCHEMA!r} "
                         "(is this a spectral-peft results.json?)")
    if results.get("version") != VERSION:
        raise ValueError(f"{source}: field 'version' is {results.get('version')!r}; this engine reads version {VERSION}")
    for f in TOP_LEVEL_FIELDS:
        if f not in results:
            raise ValueError(f"{source}: missing field {f!r}")
    if not isinstance(results["methods"], list):
        raise ValueError(f"{source}: field 'methods' must be a list, got {type(results['methods']).__name__}")
    for i, m in enumerate(results["methods"]):
        for f in METHOD_FIELDS:
            if f not in m:
                raise ValueError(f"{source}: methods[{i}] ({m.get('method', '?')}) is missing field {f!r}")
        for f in ("trainable_params", "frozen_weight_bytes", "peak_activation_bytes"):
            if not isinstance(m[f], int) or m[f] < 0:
                raise ValueError(f"{source}: methods[{i}].{f} must be a non-negative int, got {m[f]!r}")
        for f in ("ms_per_step", "final_eval_loss"):
            if not isinstance(m[f], (int, float)) or not math.isfinite(m[f]):
                raise ValueError(f"{source}: methods[{i}].{f} must be a finite number, got {m[f]!r}")


def save_results(results: dict, path: str) -> None:
    """Validate and write ``results`` to ``path`` atomically (a temporary file, then a rename)."""
    validate_results(results, source=path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, (json.dumps(results, indent=1, allow_nan=False) + "\n").encode("utf-8"))


def load_results(path: str) -> dict:
    """Read and validate a results file (a path to results.json or to the run folder holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, RESULTS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no results file at {path!r}; run `spectral-peft run` first or pass --results")
    with open(path, encoding="utf-8") as f:
        try:
            results = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
    validate_results(results, source=path)
    return results


def method_result(results: dict, method: str) -> dict | None:
    """The MethodResult of ``method``, or None when that method did not run."""
    for m in results["methods"]:
        if m["method"] == method:
            return m
    return None


TABLE_COLUMNS = ("method", "trainable params", "vs budget", "frozen-weight bytes", "peak activation bytes",
                 "ms/step", "final eval loss")


def format_table(results: dict) -> str:
    """The run's table: one row per method that ran, its trainable count against the budget."""
    budget = results["budget"].get("target") or 0
    rows = []
    for m in results["methods"]:
        vs = "(reference)" if m["method"] == "full" else f"{(m['trainable_params'] - budget) / budget:+.1%}"
        rows.append((m["method"], f"{m['trainable_params']:,}", vs, f"{m['frozen_weight_bytes']:,}",
                     f"{m['peak_activation_bytes']:,}", f"{m['ms_per_step']:.1f}", f"{m['final_eval_loss']:.4f}"))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(TABLE_COLUMNS)]
    line = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(TABLE_COLUMNS, widths)))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    n = results.get("world_size", 1)
    if n > 1:
        per = "; ".join(f"{m['method']} {' / '.join(f'{v:.1f}' for v in m['timing']['ms_per_step_by_rank'])} "
                        f"(all-reduce {m['timing']['ms_comm_per_step']:.2f})" for m in results["methods"]
                        if "timing" in m)
        out.append(f"data parallel over {n} ranks; ms/step by rank (all-reduce ms/step): {per}")
    return "\n".join(out)
