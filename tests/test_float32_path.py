"""A float32 model stays float32: no op silently upcasts to float64.

A float32 GPT-2 and a float32 Llama (grouped-query attention, RMSNorm, RoPE, SwiGLU), each with
LoRA, run a forward with labels and a backward. Checked:
- every output of every function of ``spectral_peft.ops`` called on the way (each is wrapped for
  the test wherever a module of the package imported it), so a failure names the op that upcast;
- every float array held in every module's cache after the forward (named by module path);
- the logits, the loss's dtype and every trainable parameter's gradient after the backward.
A float64 array, or any float dtype other than float32, fails. (NumPy's ufuncs are C functions that
``a * b`` reaches without a Python call, so an upcast that an op casts back before returning is
not seen; one that escapes an op is.)
"""
import sys
import types

import numpy as np
import pytest

from spectral_peft.adapters.lora import LoraConfig
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.backend import get_backend
from spectral_peft.model import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from spectral_peft.module import iter_arrays


# Outputs that are float64 by design, not activations: rope_init's inverse-frequency table (D/2,) is
# a host constant computed once in float64 (its docstring); rope_cos_sin turns it into the model's dtype.
FLOAT64_BY_DESIGN = {"spectral_peft.ops.rope.rope_init"}


def _floats(obj):
    return [a for a in iter_arrays(obj) if getattr(a, "dtype", None) is not None and a.dtype.kind == "f"]


@pytest.fixture
def op_dtypes(monkeypatch):
    """Wraps every ``spectral_peft.ops`` function wherever the package holds it; returns the list
    of (op name, dtype) for each float output that is not float32."""
    bad = []
    ops = {}
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("spectral_peft") or mod is None:
            continue
        for attr, f in list(vars(mod).items()):
            if isinstance(f, types.FunctionType) and f.__module__.startswith("spectral_peft.ops"):
                if f not in ops:
                    ops[f] = _wrap(f, bad)
                monkeypatch.setattr(mod, attr, ops[f])
    assert len(ops) > 20, "the ops were not found to wrap"
    return bad


def _wrap(f, bad):
    name = f"{f.__module__}.{f.__name__}"

    def wrapped(*args, **kwargs):
        out = f(*args, **kwargs)
        if name not in FLOAT64_BY_DESIGN:
            bad.extend((name, str(a.dtype)) for a in _floats(out) if a.dtype != np.float32)
        return out

    wrapped.__wrapped__ = f
    return wrapped


def _run(model, targets, ids, op_dtypes):
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets), seed=0)
    out = peft.forward(ids, labels=ids)
    cached = [(name, i, str(a.dtype)) for name, m in peft.named_modules()
              for i, a in enumerate(_floats(m.cache)) if a.dtype != np.float32]
    assert not cached, f"float caches that are not float32 (module, array index, dtype): {cached[:10]}"
    assert out.logits.dtype == np.float32
    assert np.isfinite(float(out.loss))
    peft.backward()
    grads = peft.named_grads()
    assert len(grads) == 2 * sum(1 for _ in peft.adapter_layers()) > 0
    wrong = {k: str(g.dtype) for k, g in grads.items() if g.dtype != np.float32}
    assert not wrong, f"gradients that are not float32: {wrong}"
    assert not op_dtypes, f"ops that returned a non-float32 float array (op, dtype): {sorted(set(op_dtypes))}"


def test_float32_gpt2_lora_never_upcasts(op_dtypes):
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=50, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1)
    model = GPT2LMHeadModel(cfg, get_backend("cpu", "float32"), seed=0)
    ids = np.random.default_rng(0).integers(0, 50, (2, 16))
    _run(model, ["c_attn", "c_proj", "c_fc"], ids, op_dtypes)


def test_float32_llama_lora_never_upcasts(op_dtypes):
    cfg = LlamaConfig(vocab_size=41, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24)
    model = LlamaForCausalLM(cfg, get_backend("cpu", "float32"), seed=0)
    ids = np.random.default_rng(1).integers(0, 41, (2, 12))
    _run(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ids, op_dtypes)
