"""The `run` command: the main job, on the embedded default, with no download.

1. Data (spectral_peft.data): the standard library's own source (docstrings removed) is the
   pretraining text; the docstrings of a disjoint set of modules are the shifted fine-tuning task
   (train and held-out eval splits). Bytes are tokens (vocabulary 256).
2. Base model (commands/pretrain.py): a small GPT-2 (``--arch llama``: a small Llama) pretrained
   by the engine and cached.
3. Fine-tuning: every method from that same base, at a matched trainable-parameter budget (within
   ``--tolerance``, 5%; full fine-tuning is the unmatched reference), the same batches, steps and
   evaluation set. Each method is a :class:`~spectral_peft.adapters.base.Recipe` of its own file;
   the budget is matched through the configs' closed parameter counts (spectral_peft.budget).
4. Output: a table (method, trainable params, frozen-weight bytes, peak activation bytes, ms/step,
   final eval loss), ``results.json`` (spectral_peft.results) and the figures, in
   ``<out>/<timestamp>/``, with ``<out>/latest`` pointing at it.

Under ``mpirun -n N spectral-peft run ...`` (docs/distributed.md) every rank runs the job on its
shard of each global batch (``--batch_size`` stays the global batch): rank 0 alone pretrains the
base (the others wait, then load the cache), prints, and writes the run folder, results.json and
the figures; results.json records ``world_size`` and each method's per-rank median ms/step and
all-reduce ms/step, printed under the table.

The options are in commands/run_options.py. Shape legend: B batch, T sequence length, V = 256.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time

import numpy as np

from .. import data as data_mod
from .. import distributed
from ..adapters.peft_model import adapted_shapes
from ..allocator import keep_freed_memory
from ..adapters.registry import recipe as get_recipe
from ..backend import ShapeBackend, blas_threads, get_backend
from ..budget import BudgetUnreachable, match_budget
from ..figures import make_figures
from ..module import match_target_modules
from ..quant.report import quantization_record
from ..results import RESULTS_FILE, format_table, new_results, save_results
from ..train import evaluate
from .contract import check_folder_option
from .long_context import long_context_phase
from .method import build_method, train_method
from .prune_rows import pruned_rows
from .pretrain import default_cache_dir, load_base, new_base, pretrain_base
from .run_options import RunConfig, add_arguments, config_from_args  # noqa: F401 - add_arguments: the CLI's


class OptionError(ValueError):
    """An option the run's own data refuses (found in the data phase, before the run folder exists)."""


class Log:
    """Prints to stdout at once (progress bars go to stderr) and keeps the lines; under N ranks
    only rank 0 prints (``quiet`` on the others)."""

    def __init__(self, quiet: bool = False):
        self.lines: list[str] = []
        self.quiet = quiet

    def __call__(self, text: str = "") -> None:
        self.lines.append(text)
        if not self.quiet:
            print(text, flush=True)


def _size_text(recipe, size) -> str:
    if isinstance(size, tuple):
        return f"r={size[0]}/{size[0] + 1} ({len(size[1])} at r+1)"
    if not recipe.knob:
        return "all weights"
    return f"d={size:.4%}" if recipe.knob == "d" else f"{recipe.knob}={size}"


def _virtual_size(recipe, cfg: RunConfig, ctx: dict, size, count) -> tuple:
    """Prefix / prompt tuning (a config with run_window): (size, count, window, capped), the budget's
    num_virtual_tokens capped at the config's run_max_virtual_tokens (``capped`` says so, else None)
    and the real tokens per window, n_positions - num_virtual_tokens; any other method unchanged,
    window None."""
    conf = recipe.make_config(cfg, size)
    if not hasattr(conf, "run_window"):
        return size, count, None, None
    cap, capped = conf.run_max_virtual_tokens(cfg), None
    if size > cap:
        capped = (f"num_virtual_tokens {cap}, capped from the budget's {size} so that at least half of the "
                  f"{cfg.n_positions} positions stay real tokens")
        size = cap
        conf = recipe.make_config(cfg, size)
        count = conf.parameter_count(ctx["shapes"])
    return size, count, conf.run_window(cfg), capped


def _train_virtual(recipe, model, cfg: RunConfig, ctx: dict, P: int, window: int, capped) -> dict:
    """Train and evaluate prefix / prompt tuning on windows of ``window`` = n_positions - P real
    tokens of the same streams (P virtual tokens take the positions before them); the record's
    extras["window"] says so, with the base's eval loss on those windows."""
    windows = data_mod.eval_batches(ctx["eval_tokens"], cfg.batch_size, window, cfg.eval_batches)
    # the tokens every method's eval scores, the 2nd..last of each window: prompt tuning's logits at
    # its last virtual position would also predict the 1st (PEFT's labels), which the others never do
    eval_sets = [{"input_ids": w, "labels": np.where(np.arange(window) == 0, -100, w)} for w in windows]
    rec = train_method(recipe, model, cfg, ctx["train_tokens"], eval_sets, window, folder=ctx.get("folder"))
    base_eval = evaluate(load_base(ctx["base_folder"], ctx["backend"]), eval_sets)
    rec["extras"]["window"] = {"real_tokens": window, "virtual_tokens": P, "n_positions": cfg.n_positions,
                               "eval_windows": int(sum(w.shape[0] for w in windows)),
                               "base_eval_loss": base_eval, "capped": capped}
    return rec


def run_method(name: str, cfg: RunConfig, ctx: dict, results: dict, log: Log) -> None:
    """Match the budget, build, train and record one method (or record why it did not run)."""
    recipe, budget, t0 = get_recipe(name), results["budget"]["target"], time.perf_counter()
    size, count, window, capped = None, None, None, None
    if recipe.knob:
        try:
            size, count = match_budget(recipe, cfg, ctx["shapes"], budget, cfg.tolerance)
        except BudgetUnreachable as exc:
            results["unavailable"].append({"method": name, "reason": str(exc)})
            log(f"method {name}: not run: {exc}")
            return
        size, count, window, capped = _virtual_size(recipe, cfg, ctx, size, count)
        if abs(count - budget) > cfg.tolerance * budget and not recipe.own_budget and capped is None:
            reason = (f"its nearest size ({_size_text(recipe, size)}) has {count:,} trainable parameters, "
                      f"{(count - budget) / budget:+.1%} from the budget {budget:,}")
            results["unavailable"].append({"method": name, "reason": reason})
            log(f"method {name}: not run: {reason}")
            return
    model, conf = build_method(recipe, cfg, ctx["base_folder"], ctx["backend"], size)
    if window is None:
        rec = train_method(recipe, model, cfg, ctx["train_tokens"], ctx["eval_sets"], folder=ctx.get("folder"))
    else:
        rec = _train_virtual(recipe, model, cfg, ctx, size, window, capped)
    seconds = time.perf_counter() - t0
    results["timing"]["methods_s"][name] = round(seconds, 2)
    settings = conf.to_json_dict(model) if conf is not None else {"method": name}
    results["methods"].append({"method": name, "settings": settings, **rec})
    log(f"method {name:>9}: {_size_text(recipe, size):<22} trainable {rec['trainable_params']:>9,}  "
        f"eval loss {rec['final_eval_loss']:.4f}  {rec['ms_per_step']:.1f} ms/step  ({seconds:.1f} s)")


# ------------------------------------------------------------------------------------------------
# The phases of the job
# ------------------------------------------------------------------------------------------------
def _data_phase(cfg: RunConfig, results: dict, log: Log) -> dict:
    t0 = time.perf_counter()
    pre = data_mod.pretrain_corpus()
    ft_train, ft_eval = data_mod.finetune_corpora()
    try:
        windows = data_mod.eval_batches(ft_eval.tokens, cfg.batch_size, cfg.n_positions, cfg.eval_batches)
    except ValueError as exc:
        raise OptionError(f"--n_positions {cfg.n_positions}: the held-out set: {exc}") from None
    for corpus, what in ((pre, "pretraining"), (ft_train, "fine-tuning")):
        if corpus.tokens.size <= cfg.n_positions:
            raise OptionError(f"--n_positions {cfg.n_positions}: the {what} text has only {corpus.tokens.size} "
                              "bytes; choose a shorter sequence length")
    results["data"] = {"tokenizer": "UTF-8 bytes (vocabulary 256)", "pretrain": pre.summary(),
                       "finetune_train": ft_train.summary(), "finetune_eval": ft_eval.summary(),
                       "eval_windows": int(sum(b.shape[0] for b in windows))}
    results["timing"]["data_s"] = round(time.perf_counter() - t0, 2)
    log(f"data: pretraining on the source code (docstrings removed) of {len(pre.modules)} standard-library modules "
        f"of Python {sys.version.split()[0]}: {pre.summary()['bytes']:,} bytes, sha256 {pre.summary()['sha256'][:12]}")
    log(f"      ({', '.join(pre.modules)})")
    log(f"data: fine-tuning on the docstrings of {len(ft_train.modules)} other modules: "
        f"{ft_train.summary()['bytes']:,} bytes train, {ft_eval.summary()['bytes']:,} bytes held out "
        f"(every {data_mod.EVAL_EVERY}th docstring); eval on {results['data']['eval_windows']} windows of "
        f"{cfg.n_positions} bytes")
    return {"pretrain": pre, "train_tokens": ft_train.tokens, "eval_tokens": ft_eval.tokens,
            "eval_sets": [{"input_ids": w, "labels": w} for w in windows]}


def _base_phase(cfg: RunConfig, ctx: dict, results: dict, log: Log) -> None:
    t0 = time.perf_counter()
    comm = distributed.world()
    if comm.is_main:
        with distributed.solo():  # rank 0 pretrains (or finds the cache) alone; the others then load it
            base_folder, record = pretrain_base(cfg, ctx["pretrain"], ctx["backend"], log)
    comm.barrier()
    if not comm.is_main:  # the cache rank 0 wrote (a cache this rank cannot see: it pretrains the same base alone)
        with distributed.solo():
            base_folder, _ = pretrain_base(cfg, ctx["pretrain"], ctx["backend"], Log(quiet=True))
        record = comm.bcast(None, root=0)
    else:
        comm.bcast(record, root=0)
    base = load_base(base_folder, ctx["backend"])
    base_eval = evaluate(base, ctx["eval_sets"])
    results["base_model"] = {"config": {"arch": cfg.arch, **base.config.to_dict()},
                             "params": int(base.num_parameters()), "pretrain": record, "eval_loss": base_eval}
    results["timing"]["pretrain_s"] = round(time.perf_counter() - t0, 2)
    log(f"base model: {_base_text(cfg, base.config)}, T {cfg.n_positions}, "
        f"{results['base_model']['params']:,} parameters; eval loss before fine-tuning {base_eval:.4f}")
    ctx["base_folder"] = base_folder
    ctx["shapes"] = adapted_shapes(base, cfg.target_list())
    lora = get_recipe("lora").make_config(cfg, cfg.r)
    budget = cfg.budget if cfg.budget is not None else lora.parameter_count(ctx["shapes"])
    results["budget"] = {"target": int(budget), "tolerance": cfg.tolerance,
                         "rule": f"LoRA r={cfg.r} on {cfg.target_modules}" if cfg.budget is None else "--budget"}
    log(f"budget: {budget:,} trainable parameters ({results['budget']['rule']}), every method within "
        f"{cfg.tolerance:.0%} (full fine-tuning is the unmatched reference)")
    results["quantization"] = quantization_record(load_base(base_folder, get_backend("cpu", "float32")),
                                                  cfg.blocksize)  # the NF4/FP4 figures' data


def _base_text(cfg: RunConfig, config) -> str:
    """The base's shape in words, for the log."""
    if cfg.arch == "llama":
        hkv = config.num_key_value_heads
        return (f"Llama, {cfg.n_layer} layers, d_model {cfg.n_embd}, {cfg.n_head} query heads sharing {hkv} "
                f"key/value head{'s' if hkv > 1 else ''}, SwiGLU width {config.intermediate_size}")
    return f"GPT-2, {cfg.n_layer} layers, d_model {cfg.n_embd}, {cfg.n_head} heads"


def _finish(cfg: RunConfig, results: dict, folder: str, t_start: float, log: Log) -> None:
    if not distributed.world().is_main:  # rank 0 writes the folder, the results and the figures
        return
    timing = results["timing"]
    t0 = time.perf_counter()
    if cfg.figures:
        results["figures"], skipped = make_figures(results, folder)
        for line in skipped:
            log(f"figure {line}")
    timing["figures_s"] = round(time.perf_counter() - t0, 2)
    timing["total_s"] = round(time.perf_counter() - t_start, 2)
    results_path = os.path.join(folder, RESULTS_FILE)
    save_results(results, results_path)
    _point_latest(cfg.out, folder)
    log("")
    log(format_table(results))
    for m in results["methods"]:  # prefix / prompt tuning: the windows their rows used
        w = m["extras"].get("window")
        if w:
            log(f"method {m['method']}: trained and evaluated on windows of {w['real_tokens']} real tokens after "
                f"{w['virtual_tokens']} virtual ones (the others: {w['n_positions']}); the base's eval loss on them "
                f"{w['base_eval_loss']:.4f}{'; ' + w['capped'] if w['capped'] else ''}")
    for u in results["unavailable"]:
        log(f"method {u['method']}: not available: {u['reason']}")
    log("")
    per = ", ".join(f"{k} {v:.1f}" for k, v in timing["methods_s"].items())
    log(f"time: data {timing['data_s']:.1f} s, base model {timing['pretrain_s']:.1f} s, methods "
        f"{sum(timing['methods_s'].values()):.1f} s ({per}), figures {timing['figures_s']:.1f} s; "
        f"total {timing['total_s']:.1f} s")
    log(f"results: {results_path}")
    if results["figures"]:
        log(f"figures: {len(results['figures'])} files in {folder}")


def _timestamp_folder(root: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = os.path.join(root, stamp)
    k = 1
    while os.path.exists(folder):
        folder = os.path.join(root, f"{stamp}-{k}")
        k += 1
    os.makedirs(folder)
    return folder


def _point_latest(root: str, folder: str) -> None:
    link = os.path.join(root, "latest")
    tmp = link + f".tmp{os.getpid()}"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.basename(folder), tmp)
        os.replace(tmp, link)
    except OSError:  # no symlinks (some filesystems): write the folder's name instead
        if os.path.lexists(link) and not os.path.isdir(link):
            os.unlink(link)
        with open(link + ".txt", "w", encoding="utf-8") as f:
            f.write(os.path.basename(folder) + "\n")


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def run(cfg: RunConfig, log: Log | None = None) -> tuple[dict, str]:
    """The whole job; returns (results, run folder)."""
    comm = distributed.world()
    log = log or Log(quiet=not comm.is_main)
    keep_freed_memory()  # the steps reuse their freed activation memory instead of faulting in fresh pages
    with blas_threads(cfg.threads):
        t_start = time.perf_counter()
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        results = new_results(created, dataclasses.asdict(cfg))
        results["timing"]["methods_s"] = {}
        results["world_size"] = comm.size
        if cfg.device == "gpu" and comm.size > 1:
            distributed.bind_device(comm)  # rank r on GPU r mod the device count, before any device array
        ctx = {"backend": get_backend(cfg.device, cfg.dtype)}
        ctx.update(_data_phase(cfg, results, log))
        # after the data phase: an option the data refuses leaves nothing; rank 0 makes it
        folder = comm.bcast(_timestamp_folder(cfg.out) if comm.is_main else None, root=0)
        ctx["folder"] = folder  # metrics.jsonl goes beside results.json
        ranks = f", data parallel over {comm.size} ranks (global batch {cfg.batch_size})" if comm.size > 1 else ""
        log(f"compute: {cfg.device} {cfg.dtype}, seed {cfg.seed}, BLAS threads "
            f"{cfg.threads if cfg.threads > 0 else 'as configured'}{ranks}; output in {folder}")
        _base_phase(cfg, ctx, results, log)
        for name in cfg.method_list():
            run_method(name, cfg, ctx, results, log)
        if cfg.longlora_context:
            long_context_phase(cfg, ctx, results, log)
        if cfg.prune is not None:
            pruned_rows(cfg, ctx, results, log)
        _finish(cfg, results, folder, t_start, log)
    return results, folder


def precheck_methods(cfg: RunConfig) -> None:
    """Build every chosen method's adapter config once (no model needed), so a bad method option
    (a RoSA --schedule, a --dylora_mode, AdaLoRA's --tinit/--tfinal) fails before any work."""
    sample = {"r": cfg.r, "init_r": cfg.init_r or cfg.r, "d": cfg.d if cfg.d is not None else 0.01, "": None,
              "num_virtual_tokens": 1}
    for name in cfg.method_list():
        recipe = get_recipe(name)
        try:
            recipe.make_config(cfg, sample[recipe.knob])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"method {name}: {exc}") from None


def precheck_targets(cfg: RunConfig) -> None:
    """Match --target_modules against a one-layer skeleton of --arch (a ShapeBackend: no memory,
    whatever the width; every layer has the same linears), so names of another architecture fail,
    listing the right ones, before the base is pretrained."""
    model = new_base(dataclasses.replace(cfg, n_layer=1), ShapeBackend("cpu", "float32"))
    try:
        match_target_modules(model, cfg.target_list())
    except ValueError as exc:
        raise ValueError(f"--target_modules {cfg.target_modules!r} on --arch {cfg.arch}: {exc}") from None


def precheck_paths(cfg: RunConfig) -> None:
    """--out, --cache_dir and --tensorboard: directories, or creatable under a writable one
    (nothing is created here)."""
    check_folder_option("--out", cfg.out)
    check_folder_option("--cache_dir", cfg.cache_dir or default_cache_dir())
    if cfg.tensorboard is not None:
        check_folder_option("--tensorboard", cfg.tensorboard)


def main(args) -> int:
    """Every option is checked before anything is created: the options themselves
    (RunConfig.validate), every chosen method's config, --target_modules against --arch, the output
    and cache folders, and, in the data phase that precedes the run folder, --n_positions against
    the data. Any of these: one line on stderr, exit status 2, no run folder. Under N ranks, also
    that N divides --batch_size and that every rank has the same options (a digest compared across
    ranks, the differing options named); rank 0 prints the line, every rank exits with status 2."""
    comm = distributed.world()
    try:
        cfg = config_from_args(args)
        distributed.check_same(comm, "the run's options", dataclasses.asdict(cfg))
        distributed.check_divisible(comm, cfg.batch_size, f"--batch_size {cfg.batch_size}: the global batch")
        precheck_methods(cfg)
        precheck_targets(cfg)
        precheck_paths(cfg)
    except ValueError as exc:
        if comm.is_main:
            print(f"spectral-peft run: error: {exc}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except OptionError as exc:
        if comm.is_main:
            print(f"spectral-peft run: error: {exc}", file=sys.stderr)
        return 2
    return 0
