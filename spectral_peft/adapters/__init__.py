"""Adapters: one file per method (lora, dora, dylora, lorafa, deltalora, adalora, rosa)."""
