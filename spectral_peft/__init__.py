"""spectral_peft: an autograd-free reference engine for parameter-efficient fine-tuning."""
__version__ = "0.1.0"
