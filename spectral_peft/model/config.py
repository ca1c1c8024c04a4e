"""Model configurations: GPT-2 and BERT, with Hugging Face's field names.

A config is a validated dataclass: every field is checked at construction, and an error names the
field, the bad value and what would be right. ``from_dict`` / ``from_json_file`` accept a Hugging
Face ``config.json`` (unknown keys such as ``architectures`` or ``bos_token_id`` are ignored);
``to_dict`` writes the fields back, with ``model_type``, so transformers can read them.

Shape legend: V vocab_size, C width (n_embd / hidden_size), L layers, H heads, hd = C/H,
4C the MLP width unless set (n_inner / intermediate_size).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from ..io.safe import FileFormatError, load_json
from ..ops.activation import ACTIVATIONS
from ..validation import check_float, check_int


def _positive_int(cfg, *names: str) -> None:
    for name in names:
        check_int(type(cfg).__name__, name, getattr(cfg, name), min=1)


def _probability(cfg, *names: str) -> None:
    for name in names:
        check_float(type(cfg).__name__, name, getattr(cfg, name), 0.0, 1.0, max_inclusive=False,
                    noun="a probability")


def _positive_float(cfg, *names: str) -> None:
    for name in names:
        check_float(type(cfg).__name__, name, getattr(cfg, name), min=0.0, min_inclusive=False)


def _activation(cfg, name: str) -> None:
    v = getattr(cfg, name)
    if v not in ACTIVATIONS:
        raise ValueError(f"{type(cfg).__name__}.{name} = {v!r} is not a known activation; known: {sorted(ACTIVATIONS)}")


class _ConfigIO:
    """from_dict / from_json_file / to_dict shared by both configs."""

    model_type = ""
    # Hugging Face fields that change the model's maths and that the engine does not implement:
    # {field: the only value accepted (transformers' default)}; any other value is refused by name.
    REFUSED: dict = {}

    @classmethod
    def from_dict(cls, d: dict):
        """Build from a Hugging Face config dict; keys that are not fields are ignored, except those
        in REFUSED, which must hold transformers' default."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}")
        mt = d.get("model_type", cls.model_type)
        if mt != cls.model_type:
            raise ValueError(f"{cls.__name__}: config model_type is {mt!r}, expected {cls.model_type!r}")
        for key, default in cls.REFUSED.items():
            if key in d and d[key] != default:
                raise ValueError(f"{cls.__name__}: config field {key} = {d[key]!r} changes the model's maths and is "
                                 f"not implemented; only {default!r} (transformers' default) is supported")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json_file(cls, path):
        """Read a Hugging Face config.json. Raises FileFormatError / ValueError naming the problem."""
        d = load_json(path)
        if not isinstance(d, dict):
            raise FileFormatError(path, f"must hold a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ValueError as exc:
            raise FileFormatError(path, str(exc)) from None

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict, with model_type (what transformers' config.json holds)."""
        d = dataclasses.asdict(self)
        d["model_type"] = self.model_type
        return d


@dataclass
class GPT2Config(_ConfigIO):
    """GPT-2 (Radford et al. 2019), field names and defaults of transformers' GPT2Config."""

    model_type = "gpt2"

    vocab_size: int = 50257  # GPT-2's byte-level BPE vocabulary
    n_positions: int = 1024  # learned position table length: the longest sequence T
    n_embd: int = 768  # model width C (GPT-2 small)
    n_layer: int = 12  # transformer blocks (GPT-2 small)
    n_head: int = 12  # attention heads; hd = n_embd / n_head = 64
    n_inner: int | None = None  # MLP width; None means 4·n_embd, as in GPT-2
    activation_function: str = "gelu_new"  # the tanh approximation of GELU GPT-2 was trained with
    layer_norm_epsilon: float = 1e-5  # PyTorch's LayerNorm default, GPT-2's value
    resid_pdrop: float = 0.1  # dropout on each block's output before the residual add
    embd_pdrop: float = 0.1  # dropout on token + position embeddings
    attn_pdrop: float = 0.1  # dropout on attention probabilities
    initializer_range: float = 0.02  # std of the normal initialisation of weights
    tie_word_embeddings: bool = True  # lm_head shares wte; the only layout this engine supports
    scale_attn_weights: bool = True  # scores scaled by 1/√hd (False: unscaled q kᵀ)
    scale_attn_by_inverse_layer_idx: bool = False  # scores of block i (from 0) further scaled by 1/(i + 1)
    # transformers' _upcast_and_reordered_attn: the scale applied to q before the product, in float32.
    # The engine always scales before the product, in the model's dtype: the same maths, and in float64
    # more accurate than the peer (which downcasts a float64 model's scores to float32 on this path)
    reorder_and_upcast_attn: bool = False

    REFUSED = {"add_cross_attention": False}  # cross-attention blocks (encoder-decoder use)

    def __post_init__(self):
        _positive_int(self, "vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPT2Config.{name} must be a bool, got {getattr(self, name)!r}")
        if self.n_inner is not None:
            _positive_int(self, "n_inner")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config.n_embd = {self.n_embd} must be divisible by n_head = {self.n_head}")
        _activation(self, "activation_function")
        _positive_float(self, "layer_norm_epsilon", "initializer_range")
        _probability(self, "resid_pdrop", "embd_pdrop", "attn_pdrop")
        if self.tie_word_embeddings is not True:
            raise ValueError(f"GPT2Config.tie_word_embeddings = {self.tie_word_embeddings!r}: only tied "
                             "lm_head/wte weights (True, GPT-2's layout) are supported")

    @property
    def inner_dim(self) -> int:
        """The MLP width: n_inner, or 4·n_embd when n_inner is None."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def attention_scale(self, layer_idx: int) -> float:
        """The factor of q kᵀ in block ``layer_idx`` (from 0): 1/√hd (scale_attn_weights), times
        1/(layer_idx + 1) (scale_attn_by_inverse_layer_idx), as transformers' GPT2Attention.scaling."""
        scale = (self.n_embd // self.n_head) ** -0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        return scale


@dataclass
class BertConfig(_ConfigIO):
    """BERT (Devlin et al. 2019), field names and defaults of transformers' BertConfig."""

    model_type = "bert"

    vocab_size: int = 30522  # BERT's uncased WordPiece vocabulary
    hidden_size: int = 768  # model width C (BERT-base)
    num_hidden_layers: int = 12  # encoder layers (BERT-base)
    num_attention_heads: int = 12  # heads; hd = 64
    intermediate_size: int = 3072  # MLP width, 4·hidden_size
    hidden_act: str = "gelu"  # the exact erf GELU BERT was trained with
    max_position_embeddings: int = 512  # learned position table length: the longest T
    type_vocab_size: int = 2  # segment ids: sentence A / sentence B
    layer_norm_eps: float = 1e-12  # BERT's (TensorFlow) LayerNorm epsilon
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and each sub-layer's output
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    num_labels: int = 2  # classifier outputs; 1 means regression with an MSE loss, as HF
    initializer_range: float = 0.02  # std of the normal initialisation of weights
    pad_token_id: int | None = 0  # [PAD]: its word-embedding row gets no gradient (PyTorch padding_idx)

    # relative position embeddings, a causal decoder, cross-attention: not implemented
    REFUSED = {"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False}

    def __post_init__(self):
        _positive_int(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels")
        if self.pad_token_id is not None and (type(self.pad_token_id) is not int
                                              or not 0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"BertConfig.pad_token_id must be None or an int in [0, vocab_size = "
                             f"{self.vocab_size}), got {self.pad_token_id!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig.hidden_size = {self.hidden_size} must be divisible by "
                             f"num_attention_heads = {self.num_attention_heads}")
        _activation(self, "hidden_act")
        _positive_float(self, "layer_norm_eps", "initializer_range")
        _probability(self, "hidden_dropout_prob", "attention_probs_dropout_prob")

    @classmethod
    def from_dict(cls, d: dict):
        # HF stores num_labels implicitly as the size of id2label.
        if isinstance(d, dict) and "num_labels" not in d and isinstance(d.get("id2label"), dict):
            d = {**d, "num_labels": len(d["id2label"])}
        cfg = super().from_dict(d)
        # the classifier's dropout is hidden_dropout_prob here; the loss follows num_labels
        cd = d.get("classifier_dropout")
        if cd is not None and cd != cfg.hidden_dropout_prob:
            raise ValueError(f"BertConfig: config field classifier_dropout = {cd!r} is not implemented; use None "
                             f"(the classifier then uses hidden_dropout_prob = {cfg.hidden_dropout_prob})")
        want = "regression" if cfg.num_labels == 1 else "single_label_classification"
        pt = d.get("problem_type")
        if pt is not None and pt != want:
            raise ValueError(f"BertConfig: config field problem_type = {pt!r} is not implemented for num_labels = "
                             f"{cfg.num_labels}; use None or {want!r} (MSE for 1 label, cross-entropy otherwise)")
        return cfg

    def to_dict(self) -> dict:
        d = super().to_dict()
        # transformers derives num_labels from id2label: write both so it reads the same count.
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return d

