"""The `figures` command: every figure of the project, regenerated from a results file.

``spectral-peft figures`` reads ``runs/latest/results.json`` (or ``--results``, a file or a run
folder; falling back to the committed ``figures/results.json``) and writes every figure where it
says, and only there:

- by default, into the folder of the results file it read (the run folder: ``runs/latest/``);
- with ``--out DIR``, into DIR, with a copy of the results file beside the figures.

It never overwrites the committed figures unless asked: when the results it read are the
committed ``figures/results.json`` (the fallback, or ``--results figures/``) and no ``--out`` is
given, it refuses (one line, exit status 2) and writes nothing; ``--out figures`` regenerates the
committed figures on purpose. Every file written is printed. ``spectral-peft run`` calls
:func:`make_figures` on its own run folder.

Each figure is one entry of :data:`FIGURES`: a file name and a function ``(results, path)`` that
draws it from the results alone, through the plotting modules in spectral_peft.plots (training.py
for every method; adalora.py, quant.py, rosa.py, dylora.py for one method each, drawing what that
method's controller reported). A figure whose data is absent from the results (its method did not
run) is skipped with a one-line reason, never faked.

One figure comes from beside the results instead: ``metrics.png`` (plots/metrics.py: throughput and
memory over the steps, one line per method) from the run's per-step ``metrics.jsonl``
(spectral_peft.monitor), drawn when that file is in the folder of the results read; with
``--out`` it is copied beside the figures like the results file.
"""
from __future__ import annotations

import os
import shutil
import sys

import numpy as np
from safetensors.numpy import load_file

from .commands.contract import check_folder_option, help_text
from .monitor import METRICS_FILE, load_metrics
from .plots import adalora as adalora_plots
from .plots import dylora as dylora_plots
from .plots import longlora as longlora_plots
from .plots import metrics as metrics_plots
from .plots import prune as prune_plots
from .plots import quant as quant_plots
from .plots import rosa as rosa_plots
from .plots import training as training_plots
from .results import RESULTS_FILE, load_results, method_result


class FigureUnavailable(Exception):
    """The results hold no data for this figure."""


def _need(results: dict, method: str, key: str | None = None):
    m = method_result(results, method)
    if m is None:
        raise FigureUnavailable(f"method {method!r} is not in the results")
    if key is None:
        return m
    value = m["extras"].get(key)
    if not value:
        raise FigureUnavailable(f"method {method!r} recorded no {key!r}")
    return value


# --- one function per figure --------------------------------------------------------------------
def fig_loss_curves(results, path):
    if not results["methods"]:
        raise FigureUnavailable("no method ran")
    training_plots.plot_loss_curves(results["methods"], path,
                                        base_eval_loss=results["base_model"].get("eval_loss"))


def fig_memory(results, path):
    if not results["methods"]:
        raise FigureUnavailable("no method ran")
    training_plots.plot_memory(results["methods"], path)


def fig_speed_quality(results, path):
    if not results["methods"]:
        raise FigureUnavailable("no method ran")
    training_plots.plot_speed_quality(results["methods"], path)


def fig_pretraining(results, path):
    curve = results["base_model"].get("pretrain", {}).get("loss_curve")
    if not curve:
        raise FigureUnavailable("the results hold no pretraining loss curve")
    training_plots.plot_pretraining(curve, path)


def fig_delta_spectra(results, path):
    if not any(m["extras"].get("singular_values") for m in results["methods"]):
        raise FigureUnavailable("no method recorded singular values of ΔW")
    training_plots.plot_delta_spectra(results["methods"], path)


def fig_adalora_ranks(results, path):
    pattern = _need(results, "adalora", "rank_pattern")
    adalora_plots.plot_rank_heatmap(pattern, path)


def fig_adalora_budget(results, path):
    sched = _need(results, "adalora", "budget_schedule")
    steps, budgets = sched["step"], sched["budget"]
    kept = None
    masked = {int(s): int(k) for s, _, k in sched.get("masked", [])}
    if masked:
        # the triplets kept at each step: the last masking at or before it
        kept, last = [], sched.get("init_bgt")
        for s in steps:
            last = masked.get(int(s), last)
            kept.append(last)
    adalora_plots.plot_budget(steps, budgets, path, kept=kept)


def fig_adalora_singular_values(results, path):
    E = _need(results, "adalora", "lora_E")
    adalora_plots.plot_singular_values(E, path)


def fig_nf4_codebooks(results, path):
    quant_plots.plot_codebooks(path)


def fig_nf4_error(results, path):
    """The quantisation error of the base model's largest linear weight (read back from the cached
    base model when it is still there), else of the quant module's default matrix."""
    weight, name = None, None
    folder = results["base_model"].get("pretrain", {}).get("cache_path")
    if folder and os.path.exists(os.path.join(folder, "model.safetensors")):
        arrays = load_file(os.path.join(folder, "model.safetensors"))
        mats = {k: v for k, v in arrays.items() if v.ndim == 2 and k.endswith(("c_fc.weight", "c_attn.weight"))}
        if mats:
            name = max(mats, key=lambda k: mats[k].size)
            weight = mats[name].T.astype("float32")  # Conv1D (d_in, d_out) -> (d_out, d_in)
            name = f"base model {name}"
    blocksize = int(results["config"].get("blocksize", 64))
    quant_plots.plot_quantization_error(path, weight=weight, name=name, blocksize=blocksize)


def fig_rosa_density(results, path):
    method = "rosa" if method_result(results, "rosa") is not None else "qrosa"
    dens = _need(results, method, "density")
    rosa_plots.plot_density_per_layer(dens, path)


def fig_rosa_support(results, path):
    method = "rosa" if method_result(results, "rosa") is not None else "qrosa"
    sup = _need(results, method, "support")
    mask = np.zeros(int(sup["shape"][0]) * int(sup["shape"][1]), dtype=bool)
    mask[np.asarray(sup["indices"], dtype=np.int64)] = True
    rosa_plots.plot_support_pattern(mask.reshape(sup["shape"]), path, title=f"RoSA support of {sup['layer']}")


def fig_dylora(results, path):
    rec = _need(results, "dylora", "rank_eval")
    dylora_plots.plot_rank_eval(rec, path)


def fig_long_context(results, path):
    rec = results.get("long_context")
    if not rec:
        raise FigureUnavailable("the run had no --longlora_context")
    longlora_plots.plot_long_context(rec, path)


def fig_pruning(results, path):
    if not results.get("pruning", {}).get("points"):
        raise FigureUnavailable("the run pruned no base (--prune)")
    prune_plots.plot_loss_vs_sparsity(results["pruning"], path)


FIGURES = (
    ("loss_curves.png", fig_loss_curves),
    ("memory.png", fig_memory),
    ("speed_quality.png", fig_speed_quality),
    ("pretraining.png", fig_pretraining),
    ("delta_singular_values.png", fig_delta_spectra),
    ("adalora_rank_heatmap.png", fig_adalora_ranks),
    ("adalora_budget.png", fig_adalora_budget),
    ("adalora_singular_values.png", fig_adalora_singular_values),
    ("nf4_codebooks.png", fig_nf4_codebooks),
    ("nf4_error.png", fig_nf4_error),
    ("rosa_density.png", fig_rosa_density),
    ("rosa_support.png", fig_rosa_support),
    ("dylora_rank_eval.png", fig_dylora),
    ("long_context.png", fig_long_context),
    ("pruning.png", fig_pruning),
)


METRICS_FIGURE = "metrics.png"


def fig_metrics(metrics_file: str, path) -> None:
    if not os.path.exists(metrics_file):
        raise FigureUnavailable(f"no {METRICS_FILE} beside the results")
    lines = load_metrics(metrics_file)
    if not lines:
        raise FigureUnavailable(f"{metrics_file} holds no step")
    metrics_plots.plot_metrics(lines, path)


def make_figures(results: dict, folder: str, metrics_file: str | None = None) -> tuple[list[str], list[str]]:
    """Draw every figure of ``results`` into ``folder``, and metrics.png from ``metrics_file``
    (None: the metrics.jsonl in ``folder``, where a run writes it). Returns (files written, one
    line per figure skipped: "<file>: not available: <reason>")."""
    os.makedirs(folder, exist_ok=True)
    written, skipped = [], []
    drawers = [(name, lambda path, fn=fn: fn(results, path)) for name, fn in FIGURES]
    drawers.append((METRICS_FIGURE, lambda path: fig_metrics(metrics_file or os.path.join(folder, METRICS_FILE),
                                                             path)))
    for name, draw in drawers:
        try:
            draw(os.path.join(folder, name))
            written.append(name)
        except FigureUnavailable as exc:
            skipped.append(f"{name}: not available: {exc}")
    return written, skipped


# --- the command --------------------------------------------------------------------------------
COMMITTED = "figures"  # the committed figures (and their results.json), relative to the project root


def add_arguments(parser) -> None:
    parser.add_argument("--results", metavar="PATH", default=None,
                        help=help_text("results.json or a run folder", "runs/latest, else figures/results.json"))
    parser.add_argument("--out", metavar="DIR", default=None,
                        help=help_text("where the figures (and a copy of the results file) go; --out figures "
                                       "overwrites the committed figures",
                                       "the folder of the results read; refused when that is figures/"))


def _default_results() -> str:
    for candidate in (os.path.join("runs", "latest"), os.path.join(COMMITTED, RESULTS_FILE)):
        if os.path.exists(candidate):
            return candidate
    return os.path.join("runs", "latest")


def _results_file(source: str) -> str:
    return os.path.join(source, RESULTS_FILE) if os.path.isdir(source) else source


def main(args) -> int:
    source = args.results or _default_results()
    src_file = _results_file(source)
    out = args.out if args.out is not None else os.path.dirname(src_file) or "."
    try:
        results = load_results(source)
        if args.out is None and os.path.abspath(out) == os.path.abspath(COMMITTED):
            raise ValueError(f"the results read are the committed {src_file}, and their folder holds the committed "
                             f"figures; pass --out DIR (--out {COMMITTED} to overwrite the committed figures)")
        check_folder_option("--out", out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"spectral-peft figures: error: {exc}", file=sys.stderr)
        return 2
    metrics_file = os.path.join(os.path.dirname(src_file), METRICS_FILE)
    written, skipped = make_figures(results, out, metrics_file)
    for src, name in ((src_file, RESULTS_FILE), (metrics_file, METRICS_FILE)):
        dest = os.path.join(out, name)
        if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(dest):
            shutil.copyfile(src, dest)  # the figures travel with the data they were drawn from
            written.append(name)
    for name in written:
        print(f"wrote {os.path.join(out, name)}")
    for line in skipped:
        print(f"figure {line}")
    return 0
