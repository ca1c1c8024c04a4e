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

Every method's config dataclass follows :class:`AdapterConfig`; :func:`get_peft_model` is the one
entry point, whatever the method.
"""
from __future__ import annotations

import importlib
from typing import ClassVar

from ..backend import host_rng
from ..module import Linear, Module
from .base import Controller, adapter_layers, inject_adapters

# peft_type -> "module:ConfigClass", imported on demand.
CONFIG_CLASSES = {
    "LORA": "spectral_peft.adapters.lora:LoraConfig",
    "ADALORA": "spectral_peft.adapters.adalora:AdaLoraConfig",
    "ROSA": "spectral_peft.adapters.rosa:RosaConfig",
}


class AdapterConfig:
    """The protocol of every method's config dataclass (LoraConfig, AdaLoraConfig, RosaConfig).

    Subclasses are dataclasses with PEFT's field names, validated in ``__post_init__`` (through
    :meth:`validate`), and they say how to build one adapter layer and the method's controller.
    """

    peft_type: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what would be right."""

    def make_layer(self, path: str, base: Linear, rng) -> Module:
        """The adapter layer wrapping ``base`` at ``path``; ``rng`` is the host generator
        (numpy.random.Generator) all initial values are drawn from, in model order."""
        raise NotImplementedError

    def make_controller(self, peft_model: PeftModel) -> Controller | None:
        """The method's training-time controller, or None when it needs none."""
        return None

    def to_json_dict(self, peft_model: PeftModel | None = None) -> dict:
        """The adapter_config.json content, PEFT's field names (peft_model: for state such as
        AdaLoRA's rank_pattern)."""
        raise NotImplementedError

    @classmethod
    def from_json_dict(cls, d: dict) -> AdapterConfig:
        raise NotImplementedError


def config_class(peft_type: str) -> type:
    """The config class for a PEFT type name, or a ValueError listing the supported ones."""
    key = str(peft_type).upper()
    if key not in CONFIG_CLASSES:
        raise ValueError(f"unsupported peft_type {peft_type!r}; supported: {sorted(CONFIG_CLASSES)}")
    module_name, cls_name = CONFIG_CLASSES[key].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


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
        config.validate()
        rng = host_rng(seed)
        inject_adapters(model, config.target_modules, lambda path, base: config.make_layer(path, base, rng))
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
        return self.model.forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        return self.model.backward(*args, **kwargs)

    def adapter_layers(self) -> list[tuple[str, Module]]:
        """(path inside the PeftModel, layer) of every adapter layer, in model order."""
        return adapter_layers(self)

    def trainable_parameter_count(self) -> int:
        return self.num_parameters(trainable_only=True)


def get_peft_model(model: Module, config: AdapterConfig, seed: int = 0) -> PeftModel:
    """Inject ``config``'s adapters into ``model`` (in place) and return the PeftModel around it."""
    return PeftModel(model, config, seed=seed)
