"""spectral_peft: an autograd-free reference engine for parameter-efficient fine-tuning.

The public API, under Hugging Face's and PEFT's names (docs/api.md). A first script:

    import spectral_peft as sp
    model = sp.GPT2LMHeadModel.from_pretrained("gpt2-folder", dtype="float64")
    peft = sp.get_peft_model(model, sp.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    sp.Trainer(peft, *sp.make_adamw(peft, lr=1e-3, weight_decay=0.0, total_steps=50)).fit(sp.SeededBatches(tokens, 8, 64), 50)
    peft.save_pretrained("adapter")

Every forward and backward is NumPy (CPU) or CuPy (GPU) written out by hand; nothing here uses
automatic differentiation.
"""
from .adapters.adalora import AdaLoraConfig
from .adapters.base import AdapterConfig, Controller
from .adapters.deltalora import DeltaLoraConfig
from .adapters.dora import DoraConfig
from .adapters.dylora import DyLoraConfig
from .adapters.longlora import LongLoraConfig
from .adapters.lora import LoraConfig
from .adapters.lorafa import LoraFAConfig
from .adapters.peft_model import PeftModel, get_peft_model, load_peft_model, merge_and_unload, save_adapter
from .adapters.prefix import PrefixTuningConfig, PromptTuningConfig
from .adapters.quantum_peft import QuantumPeftConfig
from .adapters.registry import METHODS, config_class
from .adapters.rosa import RosaConfig
from .backend import get_backend, to_device, to_host
from .generation import GenerateOutput, generate
from .model import (BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                    LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                    load_pretrained, save_pretrained)
from .optim import SGD, AdamW, clip_grad_norm, make_adamw
from .prune import prune_model
from .quant import dequantize_4bit, quantize_4bit, quantize_model
from .train import SeededBatches, Trainer, evaluate

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig", "AdamW", "AdapterConfig", "BertConfig", "BertForSequenceClassification", "BertModel",
    "Controller", "DeltaLoraConfig", "DoraConfig", "DyLoraConfig", "GPT2Config", "GPT2LMHeadModel", "GenerateOutput",
    "LlamaConfig", "LlamaForCausalLM", "LongLoraConfig", "LoraConfig", "LoraFAConfig", "METHODS", "MistralConfig", "MistralForCausalLM",
    "PeftModel", "PrefixTuningConfig", "PromptTuningConfig", "QuantumPeftConfig", "Qwen2Config", "Qwen2ForCausalLM", "RosaConfig", "SGD", "SeededBatches", "Trainer", "clip_grad_norm",
    "config_class", "dequantize_4bit", "evaluate", "generate", "get_backend", "get_peft_model", "load_peft_model",
    "load_pretrained", "make_adamw", "merge_and_unload", "prune_model", "quantize_4bit", "quantize_model", "save_adapter",
    "save_pretrained", "to_device", "to_host",
]
