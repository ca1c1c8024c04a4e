"""Worked conformance targets shipped with the package: torch_autograd (plain PyTorch) and peft_bnb (PEFT and bitsandbytes layers)."""
