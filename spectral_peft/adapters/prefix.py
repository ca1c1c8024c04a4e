"""Prefix tuning and prompt tuning: learned virtual tokens instead of weight deltas, as PEFT defines them.

Li & Liang 2021 (prefix tuning), Lester et al. 2021 (prompt tuning); facts from PEFT 0.21.2
``peft/tuners/prefix_tuning``, ``peft/tuners/prompt_tuning``, ``peft/peft_model.py``
(PeftModelForCausalLM.forward, get_prompt) and ``peft/utils/other.py``
(_prepare_prompt_learning_config). docs/prefix.md derives every gradient below.

Shape legend: B batch, T tokens, L layers, P = num_virtual_tokens, Hkv key/value heads, hd head
width, td = token_dim (prefix: Hkv·hd; prompt: C), E encoder_hidden_size, V vocabulary.

Prefix tuning (PrefixTuningConfig; GPT-2: Hkv = n_head, td = C; the LLaMA family: Hkv =
num_key_value_heads, td = Hkv·hd, as PEFT sets them for grouped-query attention)::

    Z = embedding.weight                                  (P, 2L·td)      prefix_projection off
    Z = tanh(X W1ᵀ + b1) W2ᵀ + b2,  X = embedding.weight  (P, td) -> (P, E) -> (P, 2L·td)   on
    Z.reshape(P, 2L, Hkv, hd): row 2i is layer i's keys k_p, row 2i + 1 its values v_p, each (Hkv, P, hd)
    every layer: keys [k_p | k], values [v_p | v] (B, Hkv, P + T, hd), k_p not rotated (RoPE models:
        past keys), the mask [1…1 | attention_mask] (B, P + T), the tokens at positions P..P+T-1
    trainable: P·2L·td, or with the projection P·td + (td·E + E) + (E·2L·td + 2L·td)

Prompt tuning (PromptTuningConfig; td = C)::

    x = [embedding.weight | wte[ids]]                     (B, P + T, C), positions 0..P+T-1
    mask [1…1 | attention_mask], labels [-100…-100 | labels]; the logits cover all P + T positions
    trainable: P·C

PEFT's file holds one tensor, ``prompt_embeddings``: the embedding for prompt tuning and prefix
tuning without projection, the projected prefix Z for prefix tuning with it (PEFT's
get_prompt_embedding_to_save). A file is loaded as PEFT loads it (inference_mode): Z itself is the
embedding, whatever prefix_projection says, since the MLP cannot be recovered from its output.

Init (PEFT): the embedding ~ N(0, 1) (nn.Embedding); the MLP's linears as nn.Linear (U(±1/√d_in));
prefix init_weights="zero": the embedding (or the MLP's last linear) zero. Prompt tuning's
prompt_tuning_init: "RANDOM" N(0, 1); "SAMPLE_VOCAB" word-embedding rows of ids drawn uniformly;
"TEXT" the rows of ``init_token_ids`` (the engine has no tokenizer: the ids PEFT's tokenizer gives
for prompt_tuning_init_text), repeated or cut to P as PEFT does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from .. import validation as V
from ..backend import get_xp, to_host
from ..model.layers import Activation, Embedding
from ..module import Linear, Module, ModuleList
from .base import AdapterConfig, Recipe

PEFT_KEY = "prompt_embeddings"  # the one tensor of PEFT's adapter file for both methods
RUN_REAL_FRACTION = 0.5  # the main job keeps at least this share of the positions for real tokens
IGNORE_INDEX = -100


def model_dims(model) -> dict:
    """(L, C, H, Hkv, hd, max positions) of a GPT-2 or LLaMA-family causal LM."""
    c = model.config
    if getattr(c, "model_type", None) == "gpt2":
        return {"L": c.n_layer, "C": c.n_embd, "H": c.n_head, "Hkv": c.n_head, "hd": c.n_embd // c.n_head,
                "max_positions": c.n_positions, "table": "n_positions"}
    if hasattr(c, "num_key_value_heads") and hasattr(model, "model"):
        return {"L": c.num_hidden_layers, "C": c.hidden_size, "H": c.num_attention_heads, "Hkv": c.num_key_value_heads,
                "hd": c.head_dim, "max_positions": c.max_position_embeddings, "table": "max_position_embeddings"}
    raise TypeError(f"prefix and prompt tuning take a GPT-2 or LLaMA-family causal LM, not a {type(model).__name__}")


def attention_modules(model) -> list:
    """Every layer's attention module, in order (GPT-2's h[i].attn, the LLaMA family's layers[i].self_attn)."""
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    return [getattr(b, b.PARTS[1]) for b in blocks]


def embedding_module(model) -> Embedding:
    """The word embedding (PEFT's word_embeddings): wte or embed_tokens."""
    return model.transformer.wte if hasattr(model, "transformer") else model.model.embed_tokens


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
@dataclass
class PromptLearningConfig(AdapterConfig):
    """PEFT's PromptLearningConfig fields; num_layers, token_dim and num_attention_heads are filled
    from the model by :meth:`for_model` (PEFT's _prepare_prompt_learning_config) when None."""

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    num_transformer_submodules: int = 1
    task_type: str = "CAUSAL_LM"
    inference_mode: bool = False
    modules_to_save: list | None = None

    is_prompt_learning: ClassVar[bool] = True
    target_modules: ClassVar[tuple] = ()  # no linear is wrapped

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        name = type(self).__name__
        V.check_int(name, "num_virtual_tokens", self.num_virtual_tokens, min=1)
        for f in ("token_dim", "num_attention_heads", "num_layers"):
            if getattr(self, f) is not None:
                V.check_int(name, f, getattr(self, f), min=1)
        if self.num_transformer_submodules != 1:
            raise ValueError(f"{name}: num_transformer_submodules = {self.num_transformer_submodules!r}: causal LMs "
                             "take 1 (2 is PEFT's encoder-decoder setting)")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"{name}: task_type = {self.task_type!r}; the engine's prefix and prompt tuning is "
                             "'CAUSAL_LM'")
        if self.modules_to_save:
            raise ValueError(f"{name}: modules_to_save = {self.modules_to_save!r}: not supported with prompt "
                             "learning here; pass None")

    def _model_fields(self, d: dict) -> dict:
        return {"token_dim": d["C"], "num_attention_heads": d["H"], "num_layers": d["L"]}

    def for_model(self, model) -> PromptLearningConfig:
        """This config with its model fields filled from ``model`` (PEFT's rules); a ValueError naming
        a given field that contradicts the model, or a prefix that leaves no room in the position table."""
        d = model_dims(model)
        want = self._model_fields(d)
        for f, value in want.items():
            given = getattr(self, f)
            if given is not None and given != value:
                raise ValueError(f"{type(self).__name__}: {f} = {given} does not fit the model, which needs {value} "
                                 "(or None, filled from the model)")
        if self.num_virtual_tokens >= d["max_positions"]:
            raise ValueError(f"{type(self).__name__}: num_virtual_tokens = {self.num_virtual_tokens} leaves no position "
                             f"for a token: the model's {d['table']} = {d['max_positions']}; the virtual tokens and "
                             f"the sequence together must fit it (num_virtual_tokens <= {d['max_positions'] - 1})")
        return replace(self, **want, **self._more_fields(want))

    def _more_fields(self, want: dict) -> dict:
        return {}

    def _need_dims(self) -> None:
        if None in (self.token_dim, self.num_layers, self.num_attention_heads):
            raise ValueError(f"{type(self).__name__}: parameter_count needs token_dim, num_layers and "
                             "num_attention_heads (for_model fills them from the model; the recipes from the run)")

    def run_max_virtual_tokens(self, options) -> int:
        """The most virtual tokens the main job (``spectral-peft run``) gives this config: the
        virtual tokens take the positions before the real ones (PEFT's positions) in the base's
        table of n_positions (a Llama's max_position_embeddings), and at least RUN_REAL_FRACTION
        of those positions stay real tokens. A budget that needs more is capped there."""
        return options.n_positions - math.ceil(RUN_REAL_FRACTION * options.n_positions)

    def run_window(self, options) -> int:
        """The real tokens per window the main job trains and evaluates this config on: the same
        token stream cut into windows of n_positions - num_virtual_tokens, so that virtual and
        real tokens together fill the position table the other methods' windows fill."""
        return options.n_positions - self.num_virtual_tokens

    def make_layer(self, path, base, rng):
        raise TypeError(f"{type(self).__name__} wraps no linear: PeftModel builds its prompt encoder (make_encoder)")

    def _common_json(self) -> dict:
        return {"task_type": self.task_type, "inference_mode": True, "base_model_name_or_path": None,
                "revision": None, "auto_mapping": None, "num_virtual_tokens": self.num_virtual_tokens,
                "token_dim": self.token_dim, "num_transformer_submodules": self.num_transformer_submodules,
                "num_attention_heads": self.num_attention_heads, "num_layers": self.num_layers,
                "modules_to_save": self.modules_to_save}

    @classmethod
    def _fields_from(cls, d: dict, names) -> dict:
        known = ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
                 "num_transformer_submodules", "task_type", "inference_mode", "modules_to_save", *names)
        return {k: d[k] for k in known if k in d}


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """PEFT's PrefixTuningConfig: learned key/value prefixes at every layer."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def validate(self) -> None:
        super().validate()
        V.check_bool("PrefixTuningConfig", "prefix_projection", self.prefix_projection)
        if self.encoder_hidden_size is not None:
            V.check_int("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size, min=1)
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig: init_weights = {self.init_weights!r}; choose None (random) or 'zero'")

    @property
    def projected(self) -> bool:
        """Whether the trained prefix is an MLP's output (PEFT: prefix_projection and not inference_mode)."""
        return self.prefix_projection and not self.inference_mode

    def _model_fields(self, d: dict) -> dict:
        return {"token_dim": d["Hkv"] * d["hd"], "num_attention_heads": d["Hkv"], "num_layers": d["L"]}

    def _more_fields(self, want: dict) -> dict:
        # PEFT: encoder_hidden_size defaults to token_dim
        return {} if self.encoder_hidden_size is not None else {"encoder_hidden_size": want["token_dim"]}

    def hidden(self) -> int:
        return self.encoder_hidden_size if self.encoder_hidden_size is not None else self.token_dim

    def parameter_count(self, shapes=None) -> int:
        """P·2L·td, or with the projection P·td + (td·E + E) + (E·2L·td + 2L·td); ``shapes`` unused."""
        self._need_dims()
        P, L, td = self.num_virtual_tokens, self.num_layers, self.token_dim
        if not self.projected:
            return P * 2 * L * td
        E = self.hidden()
        return P * td + (td * E + E) + (E * 2 * L * td + 2 * L * td)

    def make_encoder(self, model, rng) -> PrefixEncoder:
        return PrefixEncoder(self, model.backend, rng)

    def to_json_dict(self, peft_model=None) -> dict:
        return {"peft_type": "PREFIX_TUNING", **self._common_json(), "encoder_hidden_size": self.encoder_hidden_size,
                "prefix_projection": self.prefix_projection, "init_weights": self.init_weights}

    @classmethod
    def from_json_dict(cls, d: dict) -> PrefixTuningConfig:
        return cls(**cls._fields_from(d, ("encoder_hidden_size", "prefix_projection", "init_weights")))


PROMPT_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """PEFT's PromptTuningConfig: learned input embeddings before the tokens'. ``init_token_ids``
    (engine only, not in the file): TEXT init's token ids of prompt_tuning_init_text."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    init_token_ids: list | None = field(default=None, compare=False)

    def validate(self) -> None:
        super().validate()
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        if init not in PROMPT_INITS:
            raise ValueError(f"PromptTuningConfig: prompt_tuning_init = {self.prompt_tuning_init!r}; choose one of "
                             f"{list(PROMPT_INITS)}")
        self.prompt_tuning_init = init
        ids = self.init_token_ids
        if init == "TEXT" and not self.inference_mode and (not ids or any(type(i) is not int or i < 0 for i in ids)):
            raise ValueError("PromptTuningConfig: prompt_tuning_init = 'TEXT' needs init_token_ids, the non-empty "
                             "list of token ids of prompt_tuning_init_text (the engine has no tokenizer)")

    def parameter_count(self, shapes=None) -> int:
        """P·td (td = C); ``shapes`` unused."""
        self._need_dims()
        return self.num_virtual_tokens * self.num_transformer_submodules * self.token_dim

    def make_encoder(self, model, rng) -> PromptEmbedding:
        return PromptEmbedding(self, embedding_module(model), rng)

    def to_json_dict(self, peft_model=None) -> dict:
        return {"peft_type": "PROMPT_TUNING", **self._common_json(), "prompt_tuning_init": self.prompt_tuning_init,
                "prompt_tuning_init_text": self.prompt_tuning_init_text,
                "tokenizer_name_or_path": self.tokenizer_name_or_path, "tokenizer_kwargs": self.tokenizer_kwargs}

    @classmethod
    def from_json_dict(cls, d: dict) -> PromptTuningConfig:
        return cls(**cls._fields_from(d, ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                                          "tokenizer_kwargs")))


# ------------------------------------------------------------------------------------------------
# Encoders: the trainable part, and how they drive the model's forward and backward
# ------------------------------------------------------------------------------------------------
class PromptLearningEncoder(Module):
    """What both encoders share: the model's forward with PEFT's mask (and label) extension, the
    gradient collection after its backward, and the file tensor."""

    def prompt_embeddings(self):
        """PEFT's ``prompt_embeddings`` tensor (see the module docstring)."""
        raise NotImplementedError

    def load_prompt_embeddings(self, array) -> None:
        w = self.embedding.params["weight"]
        if tuple(array.shape) != tuple(w.shape):
            raise ValueError(f"{PEFT_KEY}: shape {tuple(array.shape)}, expected {tuple(w.shape)}")
        w[...] = self.xp.asarray(np.asarray(array), dtype=w.dtype)

    def _extend_mask(self, attention_mask, B: int):
        """[1…1 | attention_mask] (B, P + T), or None (PEFT extends only a given mask)."""
        if attention_mask is None:
            return None
        m = np.asarray(to_host(attention_mask))
        if m.ndim != 2 or m.shape[0] != B:
            raise ValueError(f"attention_mask must have input_ids' shape (B, T) with B = {B}, got {tuple(m.shape)}")
        return np.concatenate([np.ones((B, self.P), dtype=m.dtype), m], axis=1)


class PrefixEncoder(PromptLearningEncoder):
    """Z (P, 2L·td): the embedding, or the MLP ``transform`` (Linear td->E, tanh, Linear E->2L·td)
    of it (PEFT's PrefixEncoder attribute names, so the parameters are embedding.weight,
    transform.0.weight, ...)."""

    def __init__(self, config: PrefixTuningConfig, backend, rng):
        super().__init__()
        c = config
        self.P, self.L, self.Hkv = c.num_virtual_tokens, c.num_layers, c.num_attention_heads
        self.hd = c.token_dim // c.num_attention_heads
        td, out = c.token_dim, 2 * c.num_layers * c.token_dim
        self.xp = backend.xp
        zero = c.init_weights == "zero"

        def normal(shape, is_zero=False):
            return backend.asarray(np.zeros(shape) if is_zero else rng.normal(0.0, 1.0, size=shape))

        def linear(d_in, d_out, is_zero=False):  # nn.Linear's default init: U(-1/√d_in, 1/√d_in)
            bound = 1.0 / math.sqrt(d_in)
            w = np.zeros((d_out, d_in)) if is_zero else rng.uniform(-bound, bound, size=(d_out, d_in))
            b = np.zeros(d_out) if is_zero else rng.uniform(-bound, bound, size=d_out)
            return Linear(backend.asarray(w), backend.asarray(b))

        if c.projected:
            E = c.hidden()
            self.embedding = Embedding(normal((self.P, td)))
            self.transform = ModuleList([linear(td, E), Activation("tanh"), linear(E, out, zero)])
        else:
            self.embedding = Embedding(normal((self.P, out), zero))
            self.transform = None

    def flat(self):
        """Z (P, 2L·td)."""
        X = self.embedding.params["weight"]
        if self.transform is None:
            return X
        h = X
        for m in self.transform:  # Z = tanh(X W1ᵀ + b1) W2ᵀ + b2
            h = m(h)
        return h

    def prompt_embeddings(self):
        return self.flat()

    def prefixes(self):
        """[(k_p, v_p)] per layer, each (Hkv, P, hd): Z.reshape(P, 2L, Hkv, hd), rows 2i and 2i + 1."""
        Z = self.flat().reshape(self.P, 2 * self.L, self.Hkv, self.hd).transpose(1, 2, 0, 3)  # (2L, Hkv, P, hd)
        return [(Z[2 * i], Z[2 * i + 1]) for i in range(self.L)]

    def backward_prefixes(self, grads) -> None:
        """grads [(dk_p, dv_p)] per layer -> dZ (P, 2L·td) -> the embedding (through the MLP when projected)."""
        dZ = self.xp.stack([g for pair in grads for g in pair])  # (2L, Hkv, P, hd)
        # Z4 = Z.reshape(P, 2L, Hkv, hd).transpose(1, 2, 0, 3)  =>  dZ = dZ4.transpose(2, 0, 1, 3).reshape(P, 2L·td)
        dZ = dZ.transpose(2, 0, 1, 3).reshape(self.P, -1)
        if self.transform is not None:
            for m in reversed(self.transform.items):
                dZ = m.backward(dZ)  # Linear, tanh, Linear: each its own backward (dW, db accumulate)
        if "weight" not in self.embedding.frozen:
            self.embedding.accumulate("weight", dZ)

    def model_forward(self, model, input_ids, attention_mask=None, labels=None, position_ids=None, kv_cache=None,
                      **kw):
        """PeftModelForCausalLM.forward with a prefix: the mask extended by P ones on the left, the
        tokens' positions P..P+T-1 (given position_ids are offset by P, as PEFT does).

        With a kv_cache (generation, PEFT's prepare_inputs_for_generation): an empty cache is first
        filled with the prefix, which then is its positions 0..P-1 in every layer (written once,
        never rotated); every forward, the prefill and each step, extends the mask by P ones and
        offsets position_ids by P, so a left-padded row's tokens sit at P + cumsum(mask) - 1."""
        B = np.shape(input_ids)[0]
        if position_ids is not None:
            position_ids = np.asarray(to_host(position_ids)) + self.P
        prefix = self.prefixes()
        if kv_cache is not None:
            if kv_cache.length == 0:
                self.fill_cache(kv_cache, prefix, B)
            prefix = None  # now the cache's first P positions
        return model.forward(input_ids, attention_mask=self._extend_mask(attention_mask, B), labels=labels,
                             position_ids=position_ids, prefix=prefix, kv_cache=kv_cache, **kw)

    def fill_cache(self, kv_cache, prefix, B: int) -> None:
        """Write layer i's (k_p, v_p) (Hkv, P, hd), broadcast over the B rows, at the cache's positions 0..P-1."""
        for i, (k_p, v_p) in enumerate(prefix):
            kv_cache.update(i, self.xp.broadcast_to(k_p[None], (B, *k_p.shape)),
                            self.xp.broadcast_to(v_p[None], (B, *v_p.shape)))
        kv_cache.advance(self.P)

    def model_backward(self, model, dlogits=None) -> None:
        model.backward(dlogits)
        attns = attention_modules(model)
        self.backward_prefixes([a.prefix_grad for a in attns])
        for a in attns:
            a.prefix, a.prefix_grad = None, None


class PromptEmbedding(PromptLearningEncoder):
    """The (P, C) embedding put before the tokens' (PEFT's PromptEmbedding)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: Embedding, rng):
        super().__init__()
        c = config
        self.P = c.num_virtual_tokens * c.num_transformer_submodules
        W = word_embeddings.params["weight"]
        self.xp = get_xp(W)
        ids = None
        if c.prompt_tuning_init == "SAMPLE_VOCAB" and not c.inference_mode:
            ids = rng.integers(0, W.shape[0], size=self.P)
        elif c.prompt_tuning_init == "TEXT" and not c.inference_mode:
            ids = list(c.init_token_ids)
            if max(ids) >= W.shape[0]:
                raise ValueError(f"PromptTuningConfig: init_token_ids holds {max(ids)}, outside the model's vocabulary "
                                 f"[0, {W.shape[0]})")
            ids = (ids * math.ceil(self.P / len(ids)))[:self.P]  # PEFT: cut, or repeated then cut
        if ids is None:
            E = self.xp.asarray(rng.normal(0.0, 1.0, size=(self.P, c.token_dim)), dtype=W.dtype)
        else:
            E = W[self.xp.asarray(np.asarray(ids, dtype=np.int64))].copy()
        self.embedding = Embedding(E)

    def prompt_embeddings(self):
        return self.embedding.params["weight"]

    def model_forward(self, model, input_ids, attention_mask=None, labels=None, position_ids=None, kv_cache=None,
                      **kw):
        """PeftModelForCausalLM.forward with a prompt: the mask extended by P ones, labels by P × -100;
        position_ids are ignored (PEFT warns and drops them): positions 0..P+T-1.

        With a kv_cache (generation, PEFT's prepare_inputs_for_generation): the prompt goes before
        the first forward's embeddings only (an empty cache: PEFT's inputs_embeds), so the cache's
        first P positions are the prompt's; every forward extends the mask by P ones and drops
        position_ids, so the positions are the cache's, 0..P+T-1 then P+T, P+T+1, ... whatever the
        padding (as PEFT's generate numbers them)."""
        B = np.shape(input_ids)[0]
        if labels is not None:
            lab = np.asarray(to_host(labels))
            labels = np.concatenate([np.full((B, self.P), IGNORE_INDEX, dtype=lab.dtype), lab], axis=1)
        prompt = self.embedding.params["weight"] if kv_cache is None or kv_cache.length == 0 else None
        return model.forward(input_ids, attention_mask=self._extend_mask(attention_mask, B), labels=labels,
                             prompt=prompt, kv_cache=kv_cache, **kw)

    def model_backward(self, model, dlogits=None) -> None:
        model.backward(dlogits)
        inner = model.transformer if hasattr(model, "transformer") else model.model
        g, inner.prompt_grad = inner.prompt_grad, None
        if "weight" not in self.embedding.frozen:
            self.embedding.accumulate("weight", g)  # x = [E | wte[ids]]  =>  dE = Σ_B dx[:, :P]


# ------------------------------------------------------------------------------------------------
# Recipes: the main job's configs, at a budget of num_virtual_tokens
# ------------------------------------------------------------------------------------------------
def _run_dims(options) -> dict:
    C, H = options.n_embd, options.n_head
    Hkv = H // 2 if options.arch == "llama" else H  # commands/pretrain.py: a Llama base has H/2 kv heads
    return {"L": options.n_layer, "C": C, "H": H, "Hkv": Hkv, "hd": C // H}


def _prefix_for_run(options, size) -> PrefixTuningConfig:
    d = _run_dims(options)
    return PrefixTuningConfig(num_virtual_tokens=size, num_layers=d["L"], token_dim=d["Hkv"] * d["hd"],
                              num_attention_heads=d["Hkv"])


def _prompt_for_run(options, size) -> PromptTuningConfig:
    d = _run_dims(options)
    return PromptTuningConfig(num_virtual_tokens=size, num_layers=d["L"], token_dim=d["C"], num_attention_heads=d["H"])


RECIPES = (
    Recipe("prefix", "prefix tuning", _prefix_for_run, knob="num_virtual_tokens", lr_option="prompt_lr"),
    Recipe("prompt", "prompt tuning", _prompt_for_run, knob="num_virtual_tokens", lr_option="prompt_lr"),
)
