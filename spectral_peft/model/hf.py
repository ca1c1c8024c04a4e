"""Hugging Face checkpoints: load and save GPT-2 and BERT in transformers' file layout.

A checkpoint directory holds ``config.json`` and ``model.safetensors``. What is read:

- ``model_type`` "gpt2" -> :class:`GPT2LMHeadModel`; keys with or without the ``transformer.``
  prefix (the original OpenAI conversion has none); the ``attn.bias`` / ``attn.masked_bias``
  causal-mask buffers are ignored; ``lm_head.weight``, if present, must equal ``wte`` (tied).
- ``model_type`` "bert" -> :class:`BertForSequenceClassification` when the file holds
  ``classifier.weight``, else :class:`BertModel` (keys with or without ``bert.``); the
  ``embeddings.position_ids`` buffer is ignored.
- ``model_type`` "llama", "mistral", "qwen2" -> :class:`LlamaForCausalLM`,
  :class:`MistralForCausalLM`, :class:`Qwen2ForCausalLM` (keys as transformers names them); with
  tie_word_embeddings the file has no ``lm_head.weight`` (transformers drops it) or one equal to
  ``model.embed_tokens.weight``; the ``rotary_emb.inv_freq`` buffer some files carry is ignored.

The weights are ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
(``weight_map``: key -> shard file), as transformers writes models over its shard size.

GPT-2's Conv1D layers (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) store their
weight as (d_in, d_out); the engine's Linear holds (d_out, d_in): the loader transposes and
:func:`save_pretrained` / :func:`hf_gradients` transpose back.

Every key and shape is validated before the model is built: the shapes the config implies come
from a skeleton of the model (built on a memoryless ShapeBackend), so a config that does not
describe the file is refused by key and shape without allocating anything; non-finite weights
(NaN, inf) are refused by key unless asked for (``allow_nonfinite``). The model is never
half-loaded.

Shape legend: weights (d_out, d_in) in the engine, (d_in, d_out) for Conv1D in the file.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..backend import Backend, ShapeBackend, get_backend, to_host
from ..io.safe import (FileFormatError, atomic_write_bytes, check_finite, load_json, load_safetensors,
                       save_safetensors)
from .bert import BertForSequenceClassification, BertModel
from .config import BertConfig, GPT2Config
from .gpt2 import GPT2LMHeadModel
from .llama import LLAMA_MODEL_CLASSES, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from .llama_config import LLAMA_CONFIG_CLASSES

CONFIG_CLASSES = {"gpt2": GPT2Config, "bert": BertConfig, **LLAMA_CONFIG_CLASSES}
SUPPORTED_MODEL_TYPES = tuple(CONFIG_CLASSES)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's key -> shard map
# GPT-2 Conv1D weights, stored (d_in, d_out) in HF files.
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Buffers some checkpoints carry that are not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "embeddings.position_ids", "rotary_emb.inv_freq")
# What a refused non-finite weight's message adds.
NONFINITE_HINT = (" (NaN or Inf): every output and gradient would be NaN; allow them explicitly "
                  "(allow_nonfinite=True; the reference and generate commands' --allow_nonfinite)")
HEAD_KEY = "lm_head.weight"  # a tied head's key, when a file carries it (in PyTorch it names the embedding)


def is_conv1d(model, name: str) -> bool:
    """Whether the engine parameter ``name`` is a GPT-2 Conv1D weight (transposed in HF files)."""
    return isinstance(model, GPT2LMHeadModel) and name.endswith(CONV1D_SUFFIXES)


def hf_key(model, name: str) -> str:
    """The checkpoint key of the engine parameter ``name`` (the loader records the file's spelling;
    a model built in memory uses its own dotted names, which are HF's)."""
    return getattr(model, "hf_keys", {}).get(name, name)


def _hf_layout(model, name: str, array):
    return array.T if is_conv1d(model, name) else array


def hf_state_dict(model) -> dict:
    """HF key -> host array in HF layout (Conv1D transposed back), for every parameter."""
    return {hf_key(model, n): np.ascontiguousarray(_hf_layout(model, n, to_host(m.params[k])))
            for n, m, k in model.named_parameters()}


def hf_gradients(model) -> dict:
    """The engine's gradients as HF-layout host arrays keyed by the checkpoint's keys.

    Every trainable parameter is present (a zero array where no gradient was accumulated). GPT-2's
    tied head: the gradient (embedding + head) goes under wte's key, and also under
    ``lm_head.weight`` when the checkpoint holds that key (in PyTorch both names share one tensor).
    """
    out = {}
    for n, m, k in model.named_parameters(trainable_only=True):
        g = m.grads.get(k)
        g = np.zeros(m.params[k].shape, dtype=to_host(m.params[k]).dtype) if g is None else to_host(g)
        out[hf_key(model, n)] = np.ascontiguousarray(_hf_layout(model, n, g))
        if getattr(model, "hf_head_key", None) and n == model.TIED_EMBEDDING:
            out[model.hf_head_key] = out[hf_key(model, n)]
    return out


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def read_config(directory):
    """config.json -> (model_type, its config: GPT2Config, BertConfig, LlamaConfig, ...). Errors name
    the file and the field."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    d = load_json(path)
    if not isinstance(d, dict):
        raise FileFormatError(path, f"must hold a JSON object, got {type(d).__name__}")
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise FileFormatError(path, f"unsupported model_type {mt!r}; supported: {list(SUPPORTED_MODEL_TYPES)}",
                              key="model_type")
    cls = CONFIG_CLASSES[mt]
    try:
        return mt, cls.from_dict(d)
    except (ValueError, TypeError) as exc:
        raise FileFormatError(path, str(exc)) from None


def _candidates(model, name: str) -> list[str]:
    """The spellings a checkpoint may use for engine parameter ``name``."""
    if isinstance(model, GPT2LMHeadModel):
        return [name, name[len("transformer."):]]
    if isinstance(model, BertModel):
        return [name, "bert." + name]
    return [name]


def read_weights(directory) -> tuple[str, dict]:
    """(the weights' path for messages, key -> host array) from model.safetensors or, when the
    directory has no such file, from the shards that model.safetensors.index.json lists. Every
    shard must exist and hold exactly the keys the index maps to it."""
    single = os.path.join(directory, WEIGHTS_NAME)
    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.exists(single) or not os.path.exists(index_path):
        return single, load_safetensors(single)
    index = load_json(index_path)
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
        raise FileFormatError(index_path, "must hold a non-empty 'weight_map' object of key -> shard file name",
                              key="weight_map")
    arrays = {}
    for shard in sorted(set(wmap.values())):
        if os.path.basename(shard) != shard:
            raise FileFormatError(index_path, f"shard {shard!r} must be a file name in the checkpoint directory",
                                  key="weight_map")
        path = os.path.join(directory, shard)
        part = load_safetensors(path)
        want = {k for k, v in wmap.items() if v == shard}
        if set(part) != want:
            odd = sorted(set(part) ^ want)[0]
            where = "listed in the index but not in the shard" if odd in want else "in the shard but not mapped to it"
            raise FileFormatError(path, f"{where} ({INDEX_NAME})", key=odd)
        arrays.update(part)
    return index_path, arrays


def new_model(model_type: str, config, arrays: dict, backend: Backend, seed: int = 0):
    """The engine model a checkpoint of ``model_type`` holds (BERT: with a classifier or a pooler
    when the file has their weights)."""
    if model_type == "gpt2":
        return GPT2LMHeadModel(config, backend, seed)
    if model_type in LLAMA_MODEL_CLASSES:
        return LLAMA_MODEL_CLASSES[model_type](config, backend, seed)
    if "classifier.weight" in arrays:
        return BertForSequenceClassification(config, backend, seed)
    return BertModel(config, backend, seed, add_pooling_layer=any(k.endswith("pooler.dense.weight") for k in arrays))


def skeleton(model_type: str, config, arrays: dict, path: str):
    """The model ``config`` describes, built on a :class:`~spectral_peft.backend.ShapeBackend`: every
    parameter has the shape the config implies and holds no memory. ``path`` (config.json) names
    the file when the config's shapes cannot even be formed."""
    try:
        return new_model(model_type, config, arrays, ShapeBackend("cpu", "float64"))
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a shape whose size overflows an index
        raise FileFormatError(path, f"its shapes cannot be built: {exc}") from None


def plan_loading(model, arrays: dict, wpath: str, model_type: str, allow_nonfinite: bool = False):
    """Match every parameter of ``model`` (a skeleton or a real model) to the file's tensors before
    anything is built or installed: -> (plan: [(engine name, file key)], tied head key or None).

    Raises FileFormatError naming the key: a parameter missing from the file, a shape other than
    the config implies (in the file's layout), a non-float dtype, non-finite values (NaN or inf;
    unless ``allow_nonfinite``), a tied head that differs from the embedding, a tensor the model
    has no parameter for."""
    plan, used = [], set()
    for name, m, k in model.named_parameters():
        key = next((c for c in _candidates(model, name) if c in arrays), None)
        expected = tuple(_hf_layout(model, name, m.params[k]).shape)
        if key is None:
            raise FileFormatError(wpath, f"missing (expected shape {expected}; model_type {model_type!r}, "
                                         f"{type(model).__name__})", key=name)
        found = tuple(arrays[key].shape)
        if found != expected:
            raise FileFormatError(wpath, f"shape {found}, expected {expected} from {CONFIG_NAME}", key=key)
        if arrays[key].dtype.kind != "f":
            raise FileFormatError(wpath, f"dtype {arrays[key].dtype}, expected a float dtype", key=key)
        if not allow_nonfinite:
            check_finite({key: arrays[key]}, wpath, NONFINITE_HINT)
        plan.append((name, key))
        used.add(key)
    head_key = None
    if _tied(model) and HEAD_KEY in arrays:
        emb_key = next(key for n, key in plan if n == model.TIED_EMBEDDING)
        head = arrays[HEAD_KEY]
        if head.shape != arrays[emb_key].shape or not np.array_equal(head, arrays[emb_key], equal_nan=True):
            raise FileFormatError(wpath, f"differs from {emb_key!r}, but the config ties lm_head to it "
                                         "(tie_word_embeddings = true): a tied lm_head must equal the embedding",
                                  key=HEAD_KEY)
        head_key = HEAD_KEY
        used.add(head_key)
    extra = sorted(k for k in arrays if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if extra:
        raise FileFormatError(wpath, f"unexpected tensor: {type(model).__name__} has no parameter for it "
                                     f"({len(extra)} unexpected keys)", key=extra[0])
    return plan, head_key


def load_pretrained(directory, backend: Backend | None = None, seed: int = 0, allow_nonfinite: bool = False):
    """Read ``directory`` (config.json + model.safetensors, or its shards) -> a GPT2LMHeadModel,
    BertForSequenceClassification, BertModel, LlamaForCausalLM, MistralForCausalLM or
    Qwen2ForCausalLM on ``backend`` (default: CPU float32).

    Every tensor is checked against the config before the model is built: the parameters' shapes
    come from a :func:`skeleton` (the model on a ShapeBackend, no memory), so a config.json that
    does not describe the file (another model's, a wrong width, 10^7 wide) fails by key and shape
    without allocating what it implies. Non-finite weights are refused by key unless
    ``allow_nonfinite``.

    Raises FileFormatError (a ValueError) naming the file, the key and the expected/found shape;
    no model is built unless everything validates.
    """
    backend = backend or get_backend()
    directory = os.fspath(directory)
    model_type, config = read_config(directory)
    wpath, arrays = read_weights(directory)
    plan, head_key = plan_loading(skeleton(model_type, config, arrays, os.path.join(directory, CONFIG_NAME)),
                                  arrays, wpath, model_type, allow_nonfinite)
    model = new_model(model_type, config, arrays, backend, seed)
    params = {name: (m, k) for name, m, k in model.named_parameters()}
    # install (cast to the backend's dtype; Conv1D transposed to (d_out, d_in))
    for name, key in plan:
        m, k = params[name]
        a = arrays[key].T if is_conv1d(model, name) else arrays[key]
        m.params[k] = backend.asarray(np.ascontiguousarray(a, dtype=backend.float))
        m.grads.pop(k, None)
    model.hf_keys = {name: key for name, key in plan}
    model.hf_head_key = head_key
    return model


def _tied(model) -> bool:
    """Whether the model's LM head is its input embedding (GPT-2 always; LLaMA-family when tied)."""
    return isinstance(model, GPT2LMHeadModel) or (isinstance(model, LlamaForCausalLM)
                                                  and model.config.tie_word_embeddings)


def from_pretrained(cls, directory, backend: Backend | None = None, *, device: str | None = None,
                    dtype: str = "float32", seed: int = 0):
    """``cls.from_pretrained(directory)``: :func:`load_pretrained` on ``backend`` (default: the
    backend of ``device`` and ``dtype``), refusing a checkpoint of another architecture by name."""
    if backend is None:
        backend = get_backend(device, dtype)
    model = load_pretrained(directory, backend, seed=seed)
    if type(model) is not cls:
        raise FileFormatError(os.path.join(os.fspath(directory), CONFIG_NAME),
                              f"holds a {type(model).__name__}, not a {cls.__name__}; load it with "
                              f"{type(model).__name__}.from_pretrained")
    return model


# ------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------
ARCHITECTURES = {GPT2LMHeadModel: "GPT2LMHeadModel", BertForSequenceClassification: "BertForSequenceClassification",
                 BertModel: "BertModel", LlamaForCausalLM: "LlamaForCausalLM",
                 MistralForCausalLM: "MistralForCausalLM", Qwen2ForCausalLM: "Qwen2ForCausalLM"}


def save_pretrained(model, directory, dtype: str | None = None) -> None:
    """Write ``model`` as a Hugging Face checkpoint (config.json + model.safetensors) that
    transformers' ``from_pretrained`` loads. Conv1D weights are transposed back to (d_in, d_out).
    dtype: "float32"/"float64" for the stored tensors (default: the model's dtype)."""
    arch = ARCHITECTURES.get(type(model))
    if arch is None:
        raise TypeError(f"save_pretrained supports {sorted(ARCHITECTURES.values())}, got {type(model).__name__}")
    os.makedirs(directory, exist_ok=True)
    state = hf_state_dict(model)
    if dtype is not None:
        state = {k: v.astype(dtype) for k, v in state.items()}
    cfg = model.config.to_dict()
    cfg["architectures"] = [arch]
    if isinstance(model, BertModel) and not getattr(model, "pooler", None):
        cfg["add_pooling_layer"] = False
    save_safetensors(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    atomic_write_bytes(os.path.join(directory, CONFIG_NAME), json.dumps(cfg, indent=2, sort_keys=True).encode())
