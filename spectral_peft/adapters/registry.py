"""The registry: every method the engine implements, found by PEFT's name or by the main job's.

PEFT names a method in adapter_config.json by ``peft_type``; LoRA's variants share "LORA", and DoRA
is LoRA with ``use_dora``, so :func:`config_class` takes both. :func:`resolve` turns a
``LoraConfig(use_dora=True)`` into DoRA's config, so that one config class builds one layer class.

:data:`RECIPES` lists how `spectral-peft run` trains each method, in the table's order; each method
file owns its recipes (adapters/base.py, :class:`Recipe`), full fine-tuning is the one recipe here.
"""
from __future__ import annotations

from dataclasses import fields

from .adalora import RECIPES as ADALORA_RECIPES
from .adalora import AdaLoraConfig
from .base import AdapterConfig, Recipe
from .deltalora import RECIPES as DELTALORA_RECIPES
from .dora import RECIPES as DORA_RECIPES
from .dora import DoraConfig
from .dylora import RECIPES as DYLORA_RECIPES
from .longlora import RECIPES as LONGLORA_RECIPES
from .lora import RECIPES as LORA_RECIPES
from .lora import LoraConfig
from .prefix import RECIPES as PREFIX_RECIPES
from .prefix import PrefixTuningConfig, PromptTuningConfig
from .lorafa import RECIPES as LORAFA_RECIPES
from .quantum_peft import RECIPES as QUANTUM_PEFT_RECIPES
from .quantum_peft import QuantumPeftConfig
from .rosa import RECIPES as ROSA_RECIPES
from .rosa import RosaConfig

CONFIGS: dict[str, type] = {"LORA": LoraConfig, "ADALORA": AdaLoraConfig, "ROSA": RosaConfig,
                           "QUANTUM_PEFT": QuantumPeftConfig,
                           "PREFIX_TUNING": PrefixTuningConfig, "PROMPT_TUNING": PromptTuningConfig}


def config_class(peft_type: str, use_dora: bool = False) -> type:
    """The config class of a PEFT type name (DoRA's for "LORA" with ``use_dora``), or a ValueError
    listing the supported names."""
    key = str(peft_type).upper()
    if key not in CONFIGS:
        raise ValueError(f"unsupported peft_type {peft_type!r}; supported: {sorted(CONFIGS)}")
    if use_dora and key != "LORA":
        raise ValueError(f"use_dora=True goes with peft_type 'LORA', not {peft_type!r}")
    return DoraConfig if use_dora else CONFIGS[key]


def resolve(config: AdapterConfig) -> AdapterConfig:
    """``config`` itself, except that a plain ``LoraConfig(use_dora=True)`` becomes the equal
    :class:`DoraConfig` (PEFT spells DoRA as a LoraConfig flag; the engine gives it its layer)."""
    if type(config) is LoraConfig and config.use_dora:
        return DoraConfig(**{f.name: getattr(config, f.name) for f in fields(LoraConfig)})
    return config


FULL = Recipe("full", "full FT", lambda options, size: None, knob="", lr_option="full_lr")

_ORDER = ("full", "lora", "rslora", "dora", "dylora", "lorafa", "deltalora", "adalora", "rosa", "qlora", "qrosa",
          "quantum_peft", "longlora", "prefix", "prompt")
_ALL = {r.name: r for r in (FULL, *LORA_RECIPES, *DORA_RECIPES, *DYLORA_RECIPES, *LORAFA_RECIPES,
                            *DELTALORA_RECIPES, *ADALORA_RECIPES, *ROSA_RECIPES, *QUANTUM_PEFT_RECIPES,
                            *LONGLORA_RECIPES, *PREFIX_RECIPES)}
RECIPES: dict[str, Recipe] = {name: _ALL[name] for name in _ORDER}
METHODS: tuple[str, ...] = tuple(RECIPES)


def recipe(name: str) -> Recipe:
    """The recipe of a --methods name, or a ValueError listing them."""
    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return RECIPES[name]
