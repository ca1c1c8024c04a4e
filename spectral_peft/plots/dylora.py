"""DyLoRA's figure: evaluation loss against the rank used at evaluation, after one DyLoRA run.

A DyLoRA adapter trained once is evaluated at every rank b = 1..r_max without retraining
(``spectral_peft.adapters.dylora.loss_by_rank``); plain LoRA runs at fixed ranks, when given, are
drawn as separate points for comparison. Input: {rank: loss} dicts (host floats).
"""
from __future__ import annotations

from .common import pyplot



def loss_table(losses: dict, lora_losses: dict | None = None) -> str:
    """The same data as a Markdown table: rank | DyLoRA eval loss | LoRA eval loss."""
    lora_losses = lora_losses or {}
    rows = ["| rank | DyLoRA eval loss | LoRA (trained at that rank) |", "| --- | --- | --- |"]
    for b in sorted(set(losses) | set(lora_losses)):
        d = f"{losses[b]:.4f}" if b in losses else "-"
        lo = f"{lora_losses[b]:.4f}" if b in lora_losses else "-"
        rows.append(f"| {b} | {d} | {lo} |")
    return "\n".join(rows)


def plot_loss_by_rank(losses: dict, path, lora_losses: dict | None = None,
                      title: str = "DyLoRA: eval loss at every rank of one run") -> None:
    """Eval loss (y) against rank b (x): a line for the DyLoRA run, points for LoRA runs."""
    if not losses:
        raise ValueError("plot_loss_by_rank needs at least one {rank: loss} entry")
    plt = pyplot()
    ranks = sorted(losses)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ranks, [float(losses[b]) for b in ranks], "o-", label="DyLoRA (one run, any rank)")
    if lora_losses:
        lr = sorted(lora_losses)
        ax.plot(lr, [float(lora_losses[b]) for b in lr], "s", label="LoRA (one run per rank)")
    ax.set_xlabel("rank b used at evaluation")
    ax.set_ylabel("eval loss")
    ax.set_xticks(ranks)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def rank_losses(rec) -> tuple[dict, dict | None]:
    """Normalise a results record to ({rank: loss} of DyLoRA, {rank: loss} of LoRA or None).

    Accepted: {rank: loss} (JSON keys may be strings); {"losses": {...}, "lora_losses": {...}};
    {"ranks": [...], "losses": [...]} (optionally "lora_ranks"/"lora_losses" lists)."""
    def as_dict(ranks, losses):
        return {int(b): float(v) for b, v in zip(ranks, losses)}

    if not isinstance(rec, dict):
        raise ValueError(f"DyLoRA rank record must be a dict, got {type(rec).__name__}")
    if "ranks" in rec:
        lora = as_dict(rec["lora_ranks"], rec["lora_losses"]) if "lora_ranks" in rec else None
        return as_dict(rec["ranks"], rec["losses"]), lora
    if "losses" in rec:
        lora = rec.get("lora_losses")
        return ({int(b): float(v) for b, v in rec["losses"].items()},
                {int(b): float(v) for b, v in lora.items()} if lora else None)
    return {int(b): float(v) for b, v in rec.items()}, None


def plot_rank_eval(rec, path) -> None:
    """The figure from a run's results record (any form :func:`rank_losses` accepts)."""
    losses, lora = rank_losses(rec)
    plot_loss_by_rank(losses, path, lora_losses=lora)
