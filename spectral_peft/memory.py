"""Memory accounting: bytes held by parameters, gradients, optimiser state and cached activations.

Each array is counted once (by identity), so a tied parameter (GPT-2's wte/lm_head) or an array
shared between two caches is not counted twice. Activation bytes are what the caches hold right
after a forward: the peak the backward needs, since the backward only consumes caches.
"""
from __future__ import annotations

from .module import Module, iter_arrays


def _unique_bytes(arrays) -> int:
    seen, total = set(), 0
    for a in arrays:
        if id(a) not in seen:
            seen.add(id(a))
            total += int(a.nbytes)
    return total


def memory_report(model: Module, optimizer=None) -> dict:
    """-> {"trainable_param_bytes", "frozen_param_bytes", "param_bytes", "grad_bytes",
    "optimizer_bytes", "activation_bytes", "total_bytes", "trainable_params", "frozen_params"}.

    Parameter bytes count whatever each module stores (quantised codes and their statistics for a
    4-bit base); activation bytes are ``model.activation_bytes()``, meaningful right after a forward.
    """
    trainable, frozen = [], []
    n_train = n_frozen = 0
    for _, m, k in model.named_parameters():
        a = m.params[k]
        if k in m.frozen:
            frozen.append(a)
            n_frozen += int(a.size)
        else:
            trainable.append(a)
            n_train += int(a.size)
    grads = [m.grads[k] for _, m, k in model.named_parameters(trainable_only=True) if k in m.grads]
    opt = []
    if optimizer is not None:
        for slots in getattr(optimizer, "state", {}).values():
            opt.extend(iter_arrays(slots))
    report = {
        "trainable_param_bytes": _unique_bytes(trainable),
        "frozen_param_bytes": _unique_bytes(frozen),
        "grad_bytes": _unique_bytes(grads),
        "optimizer_bytes": _unique_bytes(opt),
        "activation_bytes": int(model.activation_bytes()),
        "trainable_params": n_train,
        "frozen_params": n_frozen,
    }
    report["param_bytes"] = report["trainable_param_bytes"] + report["frozen_param_bytes"]
    report["total_bytes"] = (report["param_bytes"] + report["grad_bytes"] + report["optimizer_bytes"]
                             + report["activation_bytes"])
    return report
