"""LongLoRA's figure: held-out eval loss against the evaluated context length (1x, 2x, 4x the
pretrained context T0), one line per setting of results["long_context"] (commands/long_context.py)."""
from __future__ import annotations

from .common import pyplot


def plot_long_context(record: dict, path) -> None:
    """record: results["long_context"] ({"T0", "T_train", "group_size", "eval_loss": {setting:
    {length: loss}}}); x: length / T0, y: eval loss."""
    if not record.get("eval_loss"):
        raise ValueError("plot_long_context needs a record with eval_loss entries")
    plt = pyplot()
    T0 = int(record["T0"])
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, losses in record["eval_loss"].items():
        xs = sorted(int(L) for L in losses)
        ax.plot([x / T0 for x in xs], [float(losses[str(x)]) for x in xs], "o-", label=name)
    ax.set_xscale("log", base=2)
    mult = sorted({int(L) / T0 for losses in record["eval_loss"].values() for L in losses})
    ax.set_xticks(mult)
    ax.set_xticklabels([f"{m:g}x" for m in mult])
    ax.set_xlabel(f"evaluated context (T0 = {T0} bytes)")
    ax.set_ylabel("held-out eval loss")
    ax.set_title(f"context extended to {record['T_train']}, trained with S2-Attn G = {record['group_size']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
