"""LongLoRA: LoRA on the attention projections, trainable embeddings and norms, and shifted sparse
attention (S2-Attn) while training, to extend a model's context cheaply.

Chen et al. 2024, "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models" (facts
restated from the paper and dvlab-research/LongLoRA; no code copied). docs/longlora.md derives it.

Shape legend: B batch, H query heads, T the training sequence length, G the group size, hd head
width, C model width, L layers, T0 the pretrained context, F = T_new / T0 the extension factor.

Training (module.training is True), in every attention layer:

    G = group_size_ratio · T                         (LongLoRA: 1/4, so G = T/4)
    heads h <  H/2: attention within the groups [0, G), [G, 2G), ... (causal inside each group)
    heads h >= H/2: the same after rolling q, k, v by -G/2 along T (groups straddle the others'
                    boundaries), the output rolled back by +G/2
    cost per head T·G instead of T²; the op is ops/attention.py s2_attention_forward/backward,
    tested equal to a dense (T, T) block-diagonal mask with the shifted half (tests/test_ops_s2attn.py)

Evaluation and generation (eval mode, or a KV cache): full causal attention, unchanged weights.

Trainable: LoRA (lora.py) on the attention projections (the paper's choice, ATTENTION_TARGETS:
GPT-2 attn.c_attn, attn.c_proj; Llama q_proj, k_proj, v_proj, o_proj; in the run's comparison table
LongLoRA adapts --target_modules like every method) and, through PEFT's ``modules_to_save``, the
embeddings and the normalisation layers, trained in full:

    GPT-2: ln_1, ln_2, ln_f, and wpe (the position table) when the context is extended
    Llama: "norm" (PEFT's suffix rule picks input_layernorm, post_attention_layernorm and norm)

The token embedding of these bases is tied to the language-model head (GPT-2 always, the run's
Llama too); PEFT's modules_to_save would train an untied copy of it while the head keeps the
frozen original, so it is left out (lora.modules_to_save_paths refuses a tied embedding).

    trainable = Σ_attention linears r·(d_in + d_out) + Σ_modules_to_save numel
    GPT-2:  + (2L + 1)·2C (LayerNorm weight and bias) [+ F·T0·C (wpe), extended]
    Llama:  + (2L + 1)·C (RMSNorm weight)

Context extension (:func:`extend_context`, before the adapters are injected), factor F:

- RoPE (Llama): linear position interpolation, rope_parameters {"rope_type": "linear", "factor": F}
  (a "linear" base multiplies its factor by F): inv_freq / F, so position p rotates as p/F did;
  max_position_embeddings · F.
- GPT-2's learned positions: the table is stretched by linear interpolation of its rows to F·T0:

      x = p / F,  i = floor(x),  f = x - i,  wpe'[p] = (1 - f)·wpe[i] + f·wpe[min(i + 1, T0 - 1)]
      for p = 0 .. F·T0 - 1   (rows p = F·i are the old rows exactly)

The adapter file is PEFT's LoRA file: adapter_config.json (peft_type LORA, modules_to_save) and
adapter_model.safetensors with the LoRA keys and the saved modules' weights under
``base_model.model.<path>.<param>``, as PEFT's get_peft_model_state_dict writes them. S2-Attn is a
training procedure and is not in the file (PEFT has no field for it).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import validation as V
from ..backend import to_host
from ..ops.rope import rope_init
from .base import Controller, Recipe
from .lora import LoraConfig

# What LongLoRA adapts and saves on each base architecture of the run (module docstring).
# One regex and one list serve both (PEFT: target_modules as a string is re.fullmatch'ed; a
# modules_to_save entry that matches nothing is allowed while another matches).
ATTENTION_TARGETS = r".*\.(attn\.c_attn|attn\.c_proj|q_proj|k_proj|v_proj|o_proj)"
MODULES_TO_SAVE = ["ln_1", "ln_2", "ln_f", "norm"]  # the norms; the context extension adds GPT-2's "wpe"
GROUP_SIZE_RATIO = 0.25  # G = T/4 (the paper's and LongLoRA's group_size_ratio)


def _targets_match(path: str, target_modules) -> bool:
    """PEFT's target_modules rule for one path (module.match_target_modules, without a model)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


@dataclass
class LongLoraConfig(LoraConfig):
    """LoRA's fields (written to adapter_config.json as plain PEFT LoRA with modules_to_save) plus
    two engine fields: the S2-Attn group size and the closed count of the saved modules' entries."""

    peft_type: ClassVar[str] = "LORA"

    group_size_ratio: float = GROUP_SIZE_RATIO  # G = ratio·T in training; an int fixes G itself
    extra_numel: int = 0  # saved entries the linear shapes do not determine (GPT-2's wpe: T·C), for parameter_count

    def validate(self) -> None:
        super().validate()
        n = self.name
        g = self.group_size_ratio
        if isinstance(g, bool) or not isinstance(g, (int, float)) or (isinstance(g, int) and (g < 2 or g % 2)) \
                or (isinstance(g, float) and not 0 < g <= 1):
            raise ValueError(f"{n}.group_size_ratio={g!r} must be a float in (0, 1] (G = ratio·T; LongLoRA: 0.25) "
                             "or an even int >= 2 (G itself)")
        V.check_int(n, "extra_numel", self.extra_numel, min=0)

    def group_size(self, T: int) -> int:
        """G for a training sequence of T tokens; a ValueError before any work unless G is a
        whole, even number of tokens dividing T (what s2_attention_forward requires)."""
        g = self.group_size_ratio
        G = g if isinstance(g, int) else g * T
        if G != int(G) or int(G) < 2 or int(G) % 2 or T % int(G):
            raise ValueError(f"{self.name}.group_size_ratio={g!r}: the group size G = {G:g} must be an even whole "
                             f"number of tokens dividing T = {T}; LongLoRA needs T divisible by 8 at ratio 1/4")
        return int(G)

    def make_controller(self, peft_model) -> Controller:
        """Switches S2-Attn on in every attention layer (training forwards only) and returns the
        controller that reports it."""
        layers = [m for _, m in peft_model.named_modules() if hasattr(m, "shift_group")]
        for m in layers:
            m.shift_group = self.group_size_ratio
        return LongLoraController(self.group_size_ratio, len(layers))

    def parameter_count(self, shapes: dict[str, tuple[int, int]]) -> int:
        """LoRA's Σ r·(d_in + d_out) over the shapes this config targets (the run hands every
        linear it adapts; LongLoRA keeps the attention ones) + the norms of MODULES_TO_SAVE, from
        the layer count L and width C those shapes give (norm_parameter_count) + extra_numel."""
        own = {p: s for p, s in shapes.items() if _targets_match(p, self.target_modules)}
        return super().parameter_count(own) + norm_parameter_count(own) + int(self.extra_numel)

    @classmethod
    def for_run(cls, options, size, **fields_) -> LongLoraConfig:
        """The run's LongLoRA at rank ``size``: LoRA on --target_modules (in the comparison table
        every method adapts the same linears), the norms trained (MODULES_TO_SAVE). The context
        extension passes the paper's target_modules=ATTENTION_TARGETS, and modules_to_save with
        GPT-2's position table and its extra_numel."""
        fields_.setdefault("modules_to_save", list(MODULES_TO_SAVE))
        return super().for_run(options, size, **fields_)

    def to_json_dict(self, peft_model=None) -> dict:
        return super().to_json_dict(peft_model)  # plain PEFT LoRA; S2-Attn is a training procedure


class LongLoraController(Controller):
    """S2-Attn is set once on the attention layers (LongLoraConfig.make_controller); this reports it."""

    def __init__(self, group_size_ratio, n_layers: int):
        self.group_size_ratio = group_size_ratio
        self.n_layers = n_layers

    def report(self, evaluate) -> dict:
        return {"s2_attn": {"group_size_ratio": self.group_size_ratio, "layers": self.n_layers}}


def norm_parameter_count(shapes: dict[str, tuple[int, int]]) -> int:
    """Entries of the 2L + 1 norms MODULES_TO_SAVE picks, from the attention shapes alone: L the
    number of layers holding an adapted attention linear, C the attention input width (d_in of
    c_attn / q_proj, d_out of c_proj / o_proj). GPT-2 (LayerNorm weight and bias): (2L + 1)·2C;
    the LLaMA family (RMSNorm weight): (2L + 1)·C. 0 without attention shapes."""
    layers, C, per_norm = set(), None, 1
    for p, (d_out, d_in) in shapes.items():
        head, _, leaf = p.rpartition(".")
        if leaf in ("c_attn", "q_proj", "k_proj", "v_proj"):
            C = d_in
        elif leaf in ("c_proj", "o_proj"):
            C = d_out
        else:
            continue
        per_norm = 2 if leaf.startswith("c_") else 1
        layers.add(head.rpartition(".")[0])  # the layer: "...h.0" of "...h.0.attn.c_attn"
    return 0 if C is None else (2 * len(layers) + 1) * per_norm * C


def saved_parameter_count(arch: str, n_layer: int, n_embd: int, n_positions: int = 0) -> int:
    """Closed count of what LongLoRA saves on ``arch`` (module docstring): (2L + 1) LayerNorms of 2C
    on GPT-2, plus its position table n_positions·C when extended (n_positions > 0); (2L + 1)
    RMSNorms of C on Llama."""
    if arch == "gpt2":
        return n_positions * n_embd + (2 * n_layer + 1) * 2 * n_embd
    if arch == "llama":
        return (2 * n_layer + 1) * n_embd
    raise ValueError(f"saved_parameter_count: arch must be 'gpt2' or 'llama', got {arch!r}")


# ------------------------------------------------------------------------------------------------
# Context extension
# ------------------------------------------------------------------------------------------------
def interpolate_positions(wpe, factor: int):
    """The position table stretched to factor·T0 rows by linear interpolation (module docstring).
    wpe (T0, C) host or device -> (factor·T0, C) host float64."""
    W = np.asarray(to_host(wpe), dtype=np.float64)
    T0 = W.shape[0]
    x = np.arange(factor * T0, dtype=np.float64) / factor  # (F·T0,) the old position of each new row
    i = np.floor(x).astype(np.int64)
    f = (x - i)[:, None]
    return (1.0 - f) * W[i] + f * W[np.minimum(i + 1, T0 - 1)]


def extend_context(model, factor: int):
    """Extend a plain GPT-2 or LLaMA-family model's context F = ``factor`` times, in place (the
    model is returned): GPT-2's position table interpolated to F·n_positions rows, RoPE models by
    linear position interpolation (module docstring). Refused before any change: F not an int >= 2,
    a model with adapters, a RoPE type other than default or linear."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ValueError(f"extend_context: factor must be an int >= 2 (new context / old), got {factor!r}")
    if any(hasattr(m, "base_layer") for _, m in model.named_modules()):
        raise ValueError("extend_context: extend the plain base model, before injecting adapters")
    c = model.config
    if getattr(c, "model_type", None) == "gpt2":
        wpe = model.transformer.wpe
        W = interpolate_positions(wpe.params["weight"], factor)
        old = wpe.params["weight"]
        wpe.params["weight"] = model.backend.asarray(W.astype(old.dtype))
        model.config = model.transformer.config = dataclasses.replace(c, n_positions=factor * c.n_positions)
        return model
    params = dict(c.rope_parameters)
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise ValueError(f"extend_context: rope_type {kind!r}: only 'default' or 'linear' RoPE is interpolated linearly")
    params["factor"] = float(params.get("factor", 1.0)) * factor
    params["rope_type"] = "linear"
    new = dataclasses.replace(c, rope_parameters=params, max_position_embeddings=factor * c.max_position_embeddings)
    inner = model.model
    inv_freq, inner.attention_scaling = rope_init(new.rope_parameters, new.head_dim, new.max_position_embeddings)
    inner.inv_freq = model.backend.asarray(inv_freq)
    model.config = inner.config = new
    return model


RECIPES = (
    Recipe("longlora", "LongLoRA", lambda options, size: LongLoraConfig.for_run(options, size), mixed_ranks=True),
)

__all__ = [
    "ATTENTION_TARGETS",
    "MODULES_TO_SAVE",
    "LongLoraConfig",
    "LongLoraController",
    "extend_context",
    "interpolate_positions",
    "norm_parameter_count",
    "saved_parameter_count",
]
