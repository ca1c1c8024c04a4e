"""PEFT's adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, for every method.

Generic over ``peft_type``: the config comes from ``config.to_json_dict(peft_model)`` and goes back
through ``config_class(peft_type).from_json_dict``; the tensors are each adapter layer's
``peft_state_dict() -> {suffix: array}``, stored under PEFT's key

    base_model.model.<module path>.<suffix>      e.g. base_model.model.transformer.h.0.attn.c_attn.lora_A.weight

(the adapter name dropped, as PEFT's ``get_peft_model_state_dict`` does), and read back with each
layer's ``load_peft_state_dict(arrays)`` (AdaLoRA's resizes by its rank_pattern, RoSA's carries CSR
buffers). Arrays keep the parameters' dtype on disk and are cast to the model's dtype on load.

Loading never half-loads. Everything is checked against adapter layers built off to the side
(same seed, so the same initial values) before the model is touched: the config, the target
modules, every key (none missing, none unknown) and every shape. Only then are the adapters
injected and filled. Should anything still fail, the model is put back exactly as it was (its
layers, frozen sets and gradients). Errors name the file, the key, and the expected and found shape.
"""
from __future__ import annotations

import os

from ..adapters.base import adapter_layers, match_target_modules
from ..adapters.peft_model import PeftModel, config_class
from ..backend import host_rng, to_host
from ..module import Module
from .safe import FileFormatError, load_json, load_safetensors, save_json, save_safetensors

CONFIG_NAME = "adapter_config.json"  # PEFT's file names (peft.utils.constants)
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def adapter_state_dict(peft_model: PeftModel) -> dict:
    """{PEFT file key: host array} of every adapter layer, in model order."""
    out = {}
    for path, layer in peft_model.adapter_layers():  # path starts with "base_model.model."
        for suffix, a in layer.peft_state_dict().items():
            out[f"{path}.{suffix}"] = to_host(a)
    return out


def save_adapter(peft_model: PeftModel, directory) -> None:
    """Write ``directory``/adapter_model.safetensors and adapter_config.json (each atomically),
    readable by PEFT's ``PeftModel.from_pretrained`` and by :func:`load_peft_model`."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"save_adapter needs a PeftModel, got {type(peft_model).__name__}")
    arrays = adapter_state_dict(peft_model)
    config = peft_model.peft_config.to_json_dict(peft_model)
    os.makedirs(directory, exist_ok=True)
    save_safetensors(arrays, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    save_json(config, os.path.join(directory, CONFIG_NAME))


def read_adapter_config(directory):
    """The config object of ``directory``/adapter_config.json (validated); FileFormatError otherwise."""
    path = os.path.join(directory, CONFIG_NAME)
    d = load_json(path, {"peft_type": str})
    try:
        cls = config_class(d["peft_type"])
        return cls.from_json_dict(d)
    except (ValueError, TypeError) as exc:
        raise FileFormatError(path, str(exc)) from None


def _expected_keys(layers: dict) -> dict:
    """{file key: (layer path, suffix, shape, optional)} for layers {path: layer}."""
    out = {}
    for path, layer in layers.items():
        optional = set(getattr(layer, "PEFT_OPTIONAL_KEYS", ()))
        for suffix, a in layer.peft_state_dict().items():
            out[f"{KEY_PREFIX}{path}.{suffix}"] = (path, suffix, tuple(a.shape), suffix in optional)
    return out


def _snapshot(model: Module) -> list:
    """What injection changes: every module's frozen set and gradient dict, by object."""
    return [(m, set(m.frozen), dict(m.grads)) for _, m in model.named_modules()]


def _restore(model: Module, snapshot: list, originals: dict) -> None:
    for path, base in originals.items():
        model.set_submodule(path, base)
    for m, frozen, grads in snapshot:
        m.frozen = frozen
        m.grads = grads


def load_peft_model(model: Module, adapter_dir, seed: int = 0) -> PeftModel:
    """Inject the adapter stored in ``adapter_dir`` into ``model`` and return the PeftModel.

    model: a base model (GPT2LMHeadModel, BertForSequenceClassification, ...) without adapters.
    seed:  the host seed of initial values the file does not hold (none for LoRA; DoRA's
           magnitude, AdaLoRA's triplets and RoSA's values are all in the file).
    Raises FileFormatError (a ValueError) naming the file and key on any mismatch; the model is
    then left exactly as it was passed in.
    """
    cfg_path = os.path.join(adapter_dir, CONFIG_NAME)
    st_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    config = read_adapter_config(adapter_dir)
    arrays = load_safetensors(st_path)
    if adapter_layers(model):
        raise ValueError(f"the model already holds adapter layers {[p for p, _ in adapter_layers(model)][:3]}; "
                         "load an adapter into a plain base model")

    # 1. build the adapters off to the side, in the order PeftModel builds them (same seed, same draws)
    try:
        paths = match_target_modules(model, config.target_modules)
        rng = host_rng(seed)
        trial = {p: config.make_layer(p, model.get_submodule(p), rng) for p in paths}
    except (ValueError, TypeError, KeyError) as exc:
        raise FileFormatError(cfg_path, f"does not fit the model: {exc}") from None

    # 2. every key and shape
    expected = _expected_keys(trial)
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        raise FileFormatError(st_path, f"no adapted layer of the model holds this tensor (target_modules "
                                       f"{config.target_modules!r} give keys like {sorted(expected)[:2]})",
                              key=unknown[0])
    missing = sorted(k for k, (_, _, _, optional) in expected.items() if k not in arrays and not optional)
    if missing:
        raise FileFormatError(st_path, f"missing: the model's adapted layer needs it "
                                       f"({len(missing)} of {len(expected)} keys missing)", key=missing[0])
    for key, (_, _, shape, _) in expected.items():
        if key in arrays and tuple(arrays[key].shape) != shape:
            raise FileFormatError(st_path, f"shape {tuple(arrays[key].shape)}, expected {shape}", key=key)
    per_layer = {p: {} for p in paths}
    for key, (path, suffix, _, _) in expected.items():
        if key in arrays:
            per_layer[path][suffix] = arrays[key]

    # 3. the layers' own checks (CSR structure, ranks), still off the model
    for path, layer in trial.items():
        try:
            layer.load_peft_state_dict(per_layer[path])
        except (ValueError, KeyError, TypeError) as exc:
            raise FileFormatError(st_path, f"{exc}", key=f"{KEY_PREFIX}{path}") from None

    # 4. inject and fill; put everything back if anything fails after all
    snapshot = _snapshot(model)
    originals = {p: model.get_submodule(p) for p in paths}
    try:
        peft_model = PeftModel(model, config, seed=seed)
        installed = dict((p[len(KEY_PREFIX):], layer) for p, layer in peft_model.adapter_layers())
        for path in paths:
            installed[path].load_peft_state_dict(per_layer[path])
    except BaseException:
        _restore(model, snapshot, originals)
        raise
    return peft_model
