"""LLaMA-family configurations: Llama, Mistral and Qwen2, with transformers' field names and defaults.

One dataclass, :class:`LlamaConfig`, holds every field the three share; :class:`MistralConfig`
and :class:`Qwen2Config` change the model_type, the defaults and the per-family layout:

| family  | q/k/v bias       | o_proj bias      | MLP bias   | sliding window                          |
| ------- | ---------------- | ---------------- | ---------- | --------------------------------------- |
| llama   | attention_bias   | attention_bias   | mlp_bias   | none                                    |
| mistral | none             | none             | none       | sliding_window, every layer (None: off) |
| qwen2   | always           | none             | none       | layer_types[i] == "sliding_attention"   |

Shape legend: V vocab_size, C hidden_size, L num_hidden_layers, H num_attention_heads, Hkv
num_key_value_heads (H = G·Hkv), hd head_dim (default C/H), F intermediate_size.

Rotary embedding: ``rope_parameters`` (transformers 5: rope_type, rope_theta and the type's keys,
ops/rope.py checks them); the older spelling ``rope_theta`` + ``rope_scaling`` (with ``type`` or
``rope_type``) and a top-level ``partial_rotary_factor`` are read into it. Fields that change the
maths and are not implemented are refused by name (REFUSED, and hidden_act other than silu).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ops.rope import check_rope_parameters
from ..validation import check_float, check_int
from .config import _ConfigIO

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class LlamaConfig(_ConfigIO):
    """Llama 2/3 (Touvron et al. 2023), field names and defaults of transformers' LlamaConfig."""

    model_type = "llama"

    vocab_size: int = 32000  # Llama 2's SentencePiece vocabulary
    hidden_size: int = 4096  # model width C (7B)
    intermediate_size: int = 11008  # SwiGLU width F
    num_hidden_layers: int = 32  # decoder layers L
    num_attention_heads: int = 32  # query heads H
    num_key_value_heads: int | None = None  # key/value heads Hkv (None: H, plain multi-head attention)
    head_dim: int | None = None  # per-head width (None: C/H); q_proj is C -> H·hd
    hidden_act: str = "silu"  # the gate's activation: SwiGLU = silu(gate) ⊙ up, the only one implemented
    max_position_embeddings: int = 2048  # the longest sequence T the model takes
    initializer_range: float = 0.02  # std of the normal initialisation of weights
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens (True) or is its own matrix
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    attention_bias: bool = False  # biases on q, k, v and o_proj (llama)
    attention_dropout: float = 0.0  # dropout on the attention probabilities (training only)
    mlp_bias: bool = False  # biases on gate, up and down_proj (llama)
    pad_token_id: int | None = None  # embed_tokens' padding_idx: that row gets no gradient (nn.Embedding)
    sliding_window: int | None = None  # keys farther back than W positions are not seen (where it applies)
    layer_types: list | None = None  # per layer "full_attention" / "sliding_attention" (qwen2)

    # Fields transformers' modeling code does not read (pretraining_tp, use_cache, bos/eos ids) do
    # not change the maths and are ignored; the ones that do and are not implemented are refused in
    # __post_init__ (hidden_act other than silu, an unknown rope type or rope key).

    def __post_init__(self):
        owner = type(self).__name__
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            check_int(owner, name, getattr(self, name), min=1)
        H = self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = H
        Hkv = check_int(owner, "num_key_value_heads", self.num_key_value_heads, min=1)
        if H % Hkv:
            raise ValueError(f"{owner}.num_attention_heads = {H} must be a multiple of num_key_value_heads = {Hkv}")
        if self.head_dim is None:
            if self.hidden_size % H:
                raise ValueError(f"{owner}.hidden_size = {self.hidden_size} must be divisible by "
                                 f"num_attention_heads = {H} (or set head_dim)")
            self.head_dim = self.hidden_size // H
        check_int(owner, "head_dim", self.head_dim, min=1)
        if self.hidden_act != "silu":
            raise ValueError(f"{owner}.hidden_act = {self.hidden_act!r} is not implemented; only 'silu' (SwiGLU) is")
        check_float(owner, "rms_norm_eps", self.rms_norm_eps, min=0.0, min_inclusive=False)
        check_float(owner, "initializer_range", self.initializer_range, min=0.0, min_inclusive=False)
        check_float(owner, "attention_dropout", self.attention_dropout, 0.0, 1.0, max_inclusive=False,
                    noun="a probability")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be a bool, got {getattr(self, name)!r}")
        if self.pad_token_id is not None and (type(self.pad_token_id) is not int
                                              or not 0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"{owner}.pad_token_id must be None or an int in [0, vocab_size = {self.vocab_size}), "
                             f"got {self.pad_token_id!r}")
        if self.sliding_window is not None:
            check_int(owner, "sliding_window", self.sliding_window, min=1)
        self._check_layer_types(owner)
        try:
            check_rope_parameters(self.rope_parameters, self.head_dim)
        except ValueError as exc:
            raise ValueError(f"{owner}.{exc}") from None
        prf = self.rope_parameters.get("partial_rotary_factor", 1.0)
        if prf != 1.0:
            # transformers' Llama, Mistral and Qwen2 rotate the whole head (apply_rotary_pos_emb has no
            # pass-through part): a partial factor is undefined for them (ops/rope.py implements it)
            raise ValueError(f"{owner}.rope_parameters partial_rotary_factor = {prf!r} is not supported by the "
                             f"{self.model_type} architecture, which rotates the whole head; use 1.0")

    def _check_layer_types(self, owner: str) -> None:
        if self.layer_types is None:
            return
        lt = self.layer_types
        if not isinstance(lt, list) or len(lt) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in lt):
            raise ValueError(f"{owner}.layer_types must be a list of num_hidden_layers = {self.num_hidden_layers} "
                             f"entries from {list(LAYER_TYPES)}, got {lt!r}")

    # --- the per-family layout --------------------------------------------------------------------
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    def layer_sliding_window(self, i: int) -> int | None:
        """The sliding window W of layer i, or None for full causal attention. Llama has none
        (transformers' LlamaModel never reads sliding_window or layer_types)."""
        return None

    # --- reading and writing ----------------------------------------------------------------------
    # fields of the shared dataclass that this family's transformers config does not have
    NOT_WRITTEN = ("sliding_window", "layer_types")

    @classmethod
    def from_dict(cls, d: dict):
        if isinstance(d, dict):
            d = _standard_rope(d)
        return super().from_dict(d)

    def to_dict(self) -> dict:
        d = super().to_dict()
        for name in self.NOT_WRITTEN:
            d.pop(name, None)
        return d


def _standard_rope(d: dict) -> dict:
    """Fold the older spellings (rope_theta, rope_scaling, top-level partial_rotary_factor) into
    rope_parameters, as transformers 5 does when it reads such a config.json."""
    if "rope_parameters" in d and d["rope_parameters"] is not None:
        params = dict(d["rope_parameters"]) if isinstance(d["rope_parameters"], dict) else d["rope_parameters"]
    else:
        params = {"rope_type": "default", "rope_theta": d.get("rope_theta", 10000.0)}
        scaling = d.get("rope_scaling")
        if isinstance(scaling, dict):
            scaling = dict(scaling)
            kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
            scaling.pop("type", None)
            params.update(scaling, rope_type=kind)
        elif scaling is not None:
            raise ValueError(f"rope_scaling must be a dict or null, got {scaling!r}")
    if isinstance(params, dict) and "partial_rotary_factor" in d and "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = d["partial_rotary_factor"]
    out = {k: v for k, v in d.items() if k not in ("rope_theta", "rope_scaling", "partial_rotary_factor")}
    out["rope_parameters"] = params
    return out


@dataclass
class MistralConfig(LlamaConfig):
    """Mistral (Jiang et al. 2023): no biases, a sliding window on every layer (transformers' default 4096)."""

    model_type = "mistral"

    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 131072
    sliding_window: int | None = 4096

    NOT_WRITTEN = ("layer_types",)

    @property
    def qkv_bias(self) -> bool:
        return False

    @property
    def o_bias(self) -> bool:
        return False

    def layer_sliding_window(self, i: int) -> int | None:
        return self.sliding_window  # every layer (transformers' MistralModel ignores layer_types)


@dataclass
class Qwen2Config(LlamaConfig):
    """Qwen2: q/k/v biases, no o_proj bias; sliding windows on the layers layer_types marks
    (transformers: layers >= max_window_layers when use_sliding_window)."""

    model_type = "qwen2"

    vocab_size: int = 151936
    intermediate_size: int = 22016
    num_key_value_heads: int | None = 32
    max_position_embeddings: int = 32768
    sliding_window: int | None = 4096
    use_sliding_window: bool = False
    max_window_layers: int = 28

    NOT_WRITTEN = ()

    def __post_init__(self):
        if not isinstance(self.use_sliding_window, bool):
            raise ValueError(f"Qwen2Config.use_sliding_window must be a bool, got {self.use_sliding_window!r}")
        check_int("Qwen2Config", "max_window_layers", self.max_window_layers, min=0)
        window = self.sliding_window if self.use_sliding_window else None
        if self.layer_types is None:  # transformers' derivation
            self.layer_types = ["sliding_attention" if window is not None and i >= self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]
        super().__post_init__()

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def o_bias(self) -> bool:
        return False

    def layer_sliding_window(self, i: int) -> int | None:
        # transformers' Qwen2Config sets sliding_window = None unless use_sliding_window
        if not self.use_sliding_window or self.layer_types[i] != "sliding_attention":
            return None
        return self.sliding_window


LLAMA_CONFIG_CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
