"""Adapters: one file per method (lora, dora, dylora, lorafa, deltalora, adalora, rosa).

:func:`get_peft_model` injects any method's adapters; see peft_model.py for the naming contract.
"""
from .peft_model import PeftModel, get_peft_model  # noqa: F401
