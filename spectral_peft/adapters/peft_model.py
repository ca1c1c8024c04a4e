"""PeftModel: a base model with adapters injected, named exactly as PEFT names them.

Structure mirrors PEFT so that parameter names ARE the keys of PEFT's adapter files:

    PeftModel
      .base_model   (TunerModel: PEFT's LoraModel / AdaLoraModel)
        .model      (the wrapped GPT2LMHeadModel / BertForSequenceClassification)

An adapter layer stores its parameters under their PEFT key suffix (``"lora_A.weight"``,
``"lora_B.weight"``, ``"lora_E"``, ``"lora_magnitude_vector"``), so
``peft_model.named_parameters(trainable_only=True)`` yields
``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight``: PEFT's key with the adapter name
dropped, as in ``adapter_model.safetensors``.

Every method's config follows :class:`~spectral_peft.adapters.base.AdapterConfig`;
:func:`get_peft_model` is the one entry point, whatever the method, and :func:`merge_and_unload`
the one way back to a plain model.

The adapter files (``PeftModel.save_pretrained`` / ``PeftModel.from_pretrained``, the functions
:func:`save_adapter` / :func:`load_peft_model`) are PEFT's ``adapter_config.json`` +
``adapter_model.safetensors``, for every method. Generic over ``peft_type``: the config comes from ``config.to_json_dict(peft_model)`` and goes back
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
from dataclasses import replace

import numpy as np

from ..backend import get_xp, host_rng, to_host
from ..generation import generate
from ..io.safe import (
    FileFormatError,
    load_json,
    load_safetensors,
    save_json,
    save_safetensors,
)
from ..module import Module, match_target_modules
from .base import (
    MODEL_PREFIX,
    AdapterConfig,
    Controller,
    adapter_layers,
    inject_adapters,
    model_relative,
)
from .lora import LoraConfig, modules_to_save_paths
from .prefix import PEFT_KEY
from .registry import config_class, resolve


class TunerModel(Module):
    """PEFT's LoraModel/AdaLoraModel level: holds the adapted model as ``model``."""

    def __init__(self, model: Module):
        super().__init__()
        self.model = model


class PeftModel(Module):
    """A model with adapters injected into the Linears chosen by ``config.target_modules``.

    The base is frozen; only adapter parameters are trainable. ``forward``/``backward`` delegate
    to the model (same signatures as the model's); ``controllers`` are what the training loop
    calls around each step (see adapters/base.py).
    """

    def __init__(self, model: Module, config: AdapterConfig, seed: int = 0):
        super().__init__()
        config = resolve(config)
        config.validate()
        rng = host_rng(seed)
        self.prompt_encoder = None
        if getattr(config, "is_prompt_learning", False):  # prefix / prompt tuning (adapters/prefix.py)
            config = config.for_model(model)
            encoder = config.make_encoder(model, rng)
            model.freeze_all()
            self.base_model, self.peft_config, self.controllers = TunerModel(model), config, []
            self.prompt_encoder = encoder
            self.saved_modules = []
            return
        # PEFT's modules_to_save: checked before anything changes, trainable once the base is frozen
        saved = modules_to_save_paths(model, getattr(config, "modules_to_save", None),
                                      match_target_modules(model, config.target_modules))
        inject_adapters(model, config.target_modules, lambda path, base: config.make_layer(path, base, rng))
        for path in saved:
            for _, m in model.get_submodule(path).named_modules():
                m.unfreeze()
        self.saved_modules: list[str] = saved  # paths relative to the wrapped model
        self.base_model = TunerModel(model)
        self.peft_config = config
        controller = config.make_controller(self)
        self.controllers: list[Controller] = [controller] if controller is not None else []

    @property
    def model(self) -> Module:
        return self.base_model.model

    @property
    def config(self):
        return self.model.config

    @property
    def backend(self):
        return self.model.backend

    def forward(self, *args, **kwargs):
        if self.prompt_encoder is not None:
            return self.prompt_encoder.model_forward(self.model, *args, **kwargs)
        return self.model.forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        if self.prompt_encoder is not None:
            return self.prompt_encoder.model_backward(self.model, *args, **kwargs)
        return self.model.backward(*args, **kwargs)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """KV-cache generation with the adapters computed at every step, or a prefix / prompt before the
        tokens (spectral_peft/generation.py)."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def adapter_layers(self) -> list[tuple[str, Module]]:
        """(path inside the PeftModel, layer) of every adapter layer, in model order."""
        return adapter_layers(self)

    def target_shapes(self) -> dict[str, tuple[int, int]]:
        """{path relative to the wrapped model: (d_out, d_in)} of every adapted linear."""
        return {model_relative(p): (m.d_out, m.d_in) for p, m in self.adapter_layers()}

    def save_pretrained(self, directory, path_initial_model_for_weight_conversion=None) -> None:
        """Write PEFT's adapter files into ``directory`` (:func:`save_adapter`; the option converts a
        PiSSA / OLoRA adapter to plain LoRA, as PEFT's argument of that name)."""
        save_adapter(self, directory, path_initial_model_for_weight_conversion)

    @classmethod
    def from_pretrained(cls, model: Module, directory, seed: int = 0) -> PeftModel:
        """Inject the adapter stored in ``directory`` into the plain ``model`` (:func:`load_peft_model`)."""
        return load_peft_model(model, directory, seed=seed)

    def trainable_parameter_count(self) -> int:
        """Trainable entries, with a RoSA layer's sparse values counted at their final size (nnz)
        even before its support is chosen, as peft-rosa states its budget; equals
        ``peft_config.parameter_count(target_shapes())`` plus any other trainable parameter."""
        n = self.num_parameters(trainable_only=True)
        for _, m in self.adapter_layers():
            if hasattr(m, "adapter_parameter_count"):
                own = sum(int(v.size) for k, v in m.params.items() if k not in m.frozen)
                n += int(m.adapter_parameter_count()) - own
        return int(n)

    def report(self, evaluate) -> dict:
        """Plain data for the results and figures: the singular values of every layer's ΔW (host,
        float64, the 32 largest) and each controller's :meth:`Controller.report`."""
        out: dict = {"singular_values": {}}
        for path, layer in self.adapter_layers():
            dw = np.asarray(to_host(layer.delta_weight()), dtype=np.float64)
            s = np.linalg.svd(dw, compute_uv=False)
            out["singular_values"][model_relative(path).replace("transformer.", "")] = [float(v) for v in s[:32]]
        for c in self.controllers:
            out.update(c.report(evaluate))
        return out


def get_peft_model(model: Module, config: AdapterConfig, seed: int = 0) -> PeftModel:
    """Inject ``config``'s adapters into ``model`` (in place) and return the PeftModel around it."""
    return PeftModel(model, config, seed=seed)


def merge_and_unload(peft_model: PeftModel) -> Module:
    """Merge every adapter layer into its base and put the base back in its place; returns the
    plain model (``peft_model.model``), whose outputs equal the adapted model's. The PeftModel is
    no longer usable afterwards. Every layer is checked mergeable before any weight changes."""
    if getattr(peft_model, "prompt_encoder", None) is not None:
        raise TypeError(f"{peft_model.peft_config.peft_type}: prefix and prompt tuning add virtual tokens, not weight "
                        "deltas; there is nothing to merge (generate with the PeftModel itself)")
    model = peft_model.model if isinstance(peft_model, PeftModel) else peft_model
    layers = adapter_layers(model)
    for path, layer in layers:
        if not hasattr(layer, "merge"):
            raise TypeError(f"{path}: a {type(layer).__name__} cannot be merged")
        if not layer.merged:
            layer.base_weight_for_merge()  # raises for a quantised base before anything changes
    for path, layer in layers:
        if not layer.merged:
            layer.merge()
        model.set_submodule(path, layer.base_layer)
    return model


def adapted_shapes(model: Module, target_modules) -> dict[str, tuple[int, int]]:
    """{path: (d_out, d_in)} of the linears of a plain ``model`` that ``target_modules`` chooses:
    what :meth:`AdapterConfig.parameter_count` needs, with no adapter built."""
    return {p: (model.get_submodule(p).d_out, model.get_submodule(p).d_in)
            for p in match_target_modules(model, target_modules)}


# ------------------------------------------------------------------------------------------------
# PEFT's adapter files
# ------------------------------------------------------------------------------------------------
CONFIG_NAME = "adapter_config.json"  # PEFT's file names (peft.utils.constants)
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state_dict(peft_model: PeftModel) -> dict:
    """{PEFT file key: host array} of every adapter layer, in model order (prefix / prompt tuning:
    ``prompt_embeddings`` alone, as PEFT's get_peft_model_state_dict)."""
    if peft_model.prompt_encoder is not None:
        return {PEFT_KEY: np.ascontiguousarray(to_host(peft_model.prompt_encoder.prompt_embeddings()))}
    out = {}
    for path, layer in peft_model.adapter_layers():  # path starts with "base_model.model."
        for suffix, a in layer.peft_state_dict().items():
            out[f"{path}.{suffix}"] = to_host(a)
    for path in peft_model.saved_modules:  # PEFT's key: the modules_to_save.default infix dropped
        for name, m, k in peft_model.model.get_submodule(path).named_parameters(prefix=MODEL_PREFIX + path):
            out[name] = to_host(m.params[k])
    return out


def save_adapter(peft_model: PeftModel, directory, path_initial_model_for_weight_conversion=None) -> None:
    """Write ``directory``/adapter_model.safetensors and adapter_config.json (each atomically),
    readable by PEFT's ``PeftModel.from_pretrained`` and by :func:`load_peft_model`.

    path_initial_model_for_weight_conversion: PEFT's option of that name, for LoRA only: the directory
    where the adapter was saved right after a base-changing init (PiSSA, OLoRA) and before training.
    The adapter is then written as the plain rank-2r LoRA that gives the trained model on the
    ORIGINAL base (:meth:`LoraConfig.weight_conversion`), and, as PEFT does, that directory's
    adapter_config.json is rewritten with init_lora_weights=True."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"save_adapter needs a PeftModel, got {type(peft_model).__name__}")
    arrays = adapter_state_dict(peft_model)
    cfg = peft_model.peft_config
    if path_initial_model_for_weight_conversion is not None:
        initial_dir = os.fspath(path_initial_model_for_weight_conversion)
        if not isinstance(cfg, LoraConfig):
            raise TypeError(f"path_initial_model_for_weight_conversion converts LoRA adapters, not {cfg.name}")
        initial = load_safetensors(os.path.join(initial_dir, WEIGHTS_NAME))
        try:
            converted, arrays = cfg.weight_conversion(arrays, initial)
        except ValueError as exc:
            raise ValueError(f"path_initial_model_for_weight_conversion={initial_dir!r}: {exc}") from None
        save_json(cfg.initial_config().to_json_dict(peft_model), os.path.join(initial_dir, CONFIG_NAME))
        cfg = converted
    config = cfg.to_json_dict(peft_model)
    os.makedirs(directory, exist_ok=True)
    save_safetensors(arrays, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    save_json(config, os.path.join(directory, CONFIG_NAME))


def read_adapter_config(directory):
    """The config object of ``directory``/adapter_config.json (validated); FileFormatError otherwise."""
    path = os.path.join(directory, CONFIG_NAME)
    d = load_json(path, {"peft_type": str})
    try:
        return resolve(config_class(d["peft_type"]).from_json_dict(d))
    except (ValueError, TypeError) as exc:
        raise FileFormatError(path, str(exc)) from None


def _expected_keys(layers: dict) -> dict:
    """{file key: (layer path, suffix, shape, optional)} for layers {path: layer}."""
    out = {}
    for path, layer in layers.items():
        optional = set(getattr(layer, "PEFT_OPTIONAL_KEYS", ()))
        for suffix, a in layer.peft_state_dict().items():
            out[f"{MODEL_PREFIX}{path}.{suffix}"] = (path, suffix, tuple(a.shape), suffix in optional)
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
    if getattr(config, "is_prompt_learning", False):
        return _load_prompt_learning(model, config, arrays, cfg_path, st_path, seed)

    # 1. build the adapters off to the side, in the order PeftModel builds them (same seed, same draws)
    try:
        paths = match_target_modules(model, config.target_modules)
        rng = host_rng(seed)
        trial = {p: config.make_layer(p, model.get_submodule(p), rng) for p in paths}
        saved = modules_to_save_paths(model, getattr(config, "modules_to_save", None), paths)
    except (ValueError, TypeError, KeyError) as exc:
        raise FileFormatError(cfg_path, f"does not fit the model: {exc}") from None

    # 2. every key and shape (the modules_to_save parameters under their PEFT keys too)
    expected = _expected_keys(trial)
    saved_keys = {name: (m, k) for path in saved
                  for name, m, k in model.get_submodule(path).named_parameters(prefix=MODEL_PREFIX + path)}
    expected.update({name: (None, k, tuple(m.params[k].shape), False) for name, (m, k) in saved_keys.items()})
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
        if key in arrays and key not in saved_keys:
            per_layer[path][suffix] = arrays[key]

    # 3. the layers' own checks (CSR structure, ranks), still off the model
    for path, layer in trial.items():
        try:
            layer.load_peft_state_dict(per_layer[path])
        except (ValueError, KeyError, TypeError) as exc:
            raise FileFormatError(st_path, f"{exc}", key=f"{MODEL_PREFIX}{path}") from None

    # 4. inject and fill; put everything back if anything fails after all
    snapshot = _snapshot(model)
    originals = {p: model.get_submodule(p) for p in paths}
    try:
        peft_model = PeftModel(model, config, seed=seed)
        installed = dict((p[len(MODEL_PREFIX):], layer) for p, layer in peft_model.adapter_layers())
        for path in paths:
            installed[path].load_peft_state_dict(per_layer[path])
        for key, (m, k) in saved_keys.items():  # in place, cast to the parameter's dtype
            m.params[k][...] = get_xp(m.params[k]).asarray(to_host(arrays[key]).astype(m.params[k].dtype))
    except BaseException:
        _restore(model, snapshot, originals)
        raise
    return peft_model


def _load_prompt_learning(model: Module, config, arrays: dict, cfg_path, st_path, seed: int) -> PeftModel:
    """Prefix / prompt tuning from PEFT's files, as PEFT loads them (inference_mode: the file's
    prompt_embeddings is the trained tensor, the projected prefix for prefix_projection); every
    check before the model is touched."""
    config = replace(config, inference_mode=True)
    try:
        filled = config.for_model(model)
    except (ValueError, TypeError) as exc:
        raise FileFormatError(cfg_path, f"does not fit the model: {exc}") from None
    unknown = sorted(set(arrays) - {PEFT_KEY})
    if unknown:
        raise FileFormatError(st_path, f"{filled.peft_type} files hold only {PEFT_KEY!r}", key=unknown[0])
    if PEFT_KEY not in arrays:
        raise FileFormatError(st_path, "missing: the prompt encoder's tensor", key=PEFT_KEY)
    P = filled.num_virtual_tokens
    shape = (P, filled.parameter_count() // P)
    if tuple(arrays[PEFT_KEY].shape) != shape:
        raise FileFormatError(st_path, f"shape {tuple(arrays[PEFT_KEY].shape)}, expected {shape}", key=PEFT_KEY)
    snapshot = _snapshot(model)
    try:
        peft_model = PeftModel(model, filled, seed=seed)
        peft_model.prompt_encoder.load_prompt_embeddings(arrays[PEFT_KEY])
    except BaseException:
        _restore(model, snapshot, {})
        raise
    return peft_model
