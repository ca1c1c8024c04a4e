"""The transformers peer of the LLaMA-family tests, made float64 throughout.

transformers computes three steps in float32 even in a float64 model (docs/validating.md):
RoPE's inv_freq and cos/sin (``dtype=torch.float`` in modeling_rope_utils and the rotary
embedding's forward), RMSNorm (``hidden_states.to(torch.float32)``) and the eager attention's
softmax (``softmax(..., dtype=torch.float32)``): a ~1e-7 relative error. ``float64_peer`` rebinds
``torch.float`` and ``torch.float32`` to float64 while the peer is built and runs its forward, so
that those very lines compute in float64: the peer's own formulas, at the engine's precision. The
backward is autograd's (C++), which follows the dtypes the forward produced.
"""
from __future__ import annotations

import contextlib

import numpy as np

torch_mod = None


def _torch():
    global torch_mod
    if torch_mod is None:
        import torch

        torch_mod = torch
    return torch_mod


@contextlib.contextmanager
def float64_peer(enabled: bool = True):
    """Within the block, ``torch.float`` and ``torch.float32`` name float64 (see the module docstring)."""
    torch = _torch()
    if not enabled:
        yield
        return
    saved = torch.float, torch.float32
    torch.float = torch.float32 = torch.float64
    try:
        yield
    finally:
        torch.float, torch.float32 = saved


def peer_model(directory, dtype: str = "float64"):
    """transformers' model of ``directory`` (eager attention, eval mode) in ``dtype``; a float64
    peer is built with its rotary frequencies in float64 (float64_peer)."""
    torch = _torch()
    import transformers

    transformers.logging.set_verbosity_error()
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    with float64_peer(dtype == "float64"):
        tm = transformers.AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager",
                                                               dtype=tdtype)
    return tm.eval()


def peer_forward(tm, dtype: str = "float64", **kw):
    """tm(**kw) with torch tensors made from NumPy arrays, float64 throughout for a float64 peer."""
    torch = _torch()
    args = {k: torch.tensor(np.asarray(v)) for k, v in kw.items() if v is not None}
    with float64_peer(dtype == "float64"):
        return tm(**args)


def causal_lm_loss(logits, labels):
    """HF's causal-LM loss written out in torch: position t predicts labels[:, t+1]."""
    torch = _torch()
    V = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V),
                                             torch.tensor(np.asarray(labels))[:, 1:].reshape(-1), ignore_index=-100)
