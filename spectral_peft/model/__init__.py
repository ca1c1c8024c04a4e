"""Models: configs, GPT-2, BERT and the LLaMA family (Llama, Mistral, Qwen2) assembled from the ops, Hugging Face loading and saving.

    from spectral_peft.model import GPT2Config, GPT2LMHeadModel, load_pretrained
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4), get_backend("cpu", "float64"))
    out = model.forward(ids, labels=ids); model.backward()

See docs/models.md.
"""
from ..generation import generate
from .bert import BertForSequenceClassification, BertModel
from .config import BertConfig, GPT2Config
from .gpt2 import GPT2LMHeadModel, GPT2Model
from .hf import (
    from_pretrained,
    hf_gradients,
    hf_key,
    hf_state_dict,
    is_conv1d,
    load_pretrained,
    read_config,
    save_pretrained,
)
from .kv_cache import KVCache
from .layers import Activation, Dropout, Embedding, LayerNorm, RMSNorm
from .llama import LlamaForCausalLM, LlamaModel, MistralForCausalLM, Qwen2ForCausalLM
from .llama_config import LlamaConfig, MistralConfig, Qwen2Config
from .output import ModelOutput

# Hugging Face's two verbs on every model class. hf.py reads and writes checkpoints of these classes
# (it imports them), so the classes receive the verbs here, once both exist.
for _cls in (GPT2LMHeadModel, BertModel, BertForSequenceClassification, LlamaForCausalLM, MistralForCausalLM,
             Qwen2ForCausalLM):
    _cls.from_pretrained = classmethod(from_pretrained)
    _cls.save_pretrained = save_pretrained


def _generate(self, input_ids, attention_mask=None, **kwargs):
    """transformers' verb: ``spectral_peft.generation.generate(self, input_ids, attention_mask, ...)``."""
    return generate(self, input_ids, attention_mask, **kwargs)


for _cls in (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM):
    _cls.generate = _generate
del _cls

__all__ = [
    "Activation", "BertConfig", "BertForSequenceClassification", "BertModel", "Dropout", "Embedding",
    "GPT2Config", "GPT2LMHeadModel", "GPT2Model", "KVCache", "LayerNorm", "LlamaConfig", "LlamaForCausalLM",
    "LlamaModel", "MistralConfig", "MistralForCausalLM", "ModelOutput", "Qwen2Config", "Qwen2ForCausalLM",
    "RMSNorm", "hf_gradients", "hf_key", "hf_state_dict", "is_conv1d", "load_pretrained", "read_config",
    "save_pretrained",
]
