"""The `reference` command: reference logits, loss and gradients of a Hugging Face model (and a PEFT
adapter), in float64 by default. The contract (docs/models.md, DESIGN.md):

    spectral-peft reference --model DIR [--adapter DIR] --inputs IN.safetensors --out OUT.safetensors
                            [--dtype float64|float32]

IN holds ``input_ids`` (B, T) int; optional ``attention_mask`` (B, T) 0/1, ``token_type_ids``
(B, T) (BERT), ``labels`` (causal LMs, GPT-2 and the LLaMA family: (B, T) with -100 ignored and
HF's shift; BERT (B,) class ids, or
float targets when num_labels = 1), and ``dlogits``: an upstream gradient of the output, with its
shape (an extension: the gradient of Σ output ⊙ dlogits, used where there are no labels, e.g. a
bare BertModel). OUT holds ``logits`` (``last_hidden_state`` for a bare BertModel), ``loss`` (a
0-d array) when labels were given, and ``grad.<key>`` for every trainable parameter when there is
a loss or a dlogits: ``<key>`` is the parameter's key in the model file (no adapter; Conv1D
gradients in the file's (d_in, d_out) layout; a tied head (GPT-2, LLaMA-family models with
tie_word_embeddings) under the embedding's key, and also under
``lm_head.weight`` when the file has it), or in the adapter file (with an adapter: only its
parameters; prefix and prompt tuning: ``grad.prompt_embeddings``, and for prompt tuning the logits
cover the virtual positions too, (B, P + T, V), as PEFT's forward returns them). With an AdaLoRA adapter the loss includes orth_reg_weight times the orthogonal
regulariser, as PEFT's AdaLoraModel.forward does. Dropout is off.

Refused before any work (one line on stderr naming the problem, exit status 2, no OUT file; it is
written atomically at the end, so no other error leaves one either):

- a checkpoint whose config.json implies other shapes than its tensors have (checked against a
  memoryless skeleton of the model before anything is allocated; spectral_peft.model.hf);
- non-finite weights (NaN, inf), named by key, in the checkpoint or the adapter: every output and
  gradient would be NaN. ``--allow_nonfinite`` computes with them anyway;
- labels that keep no token (causal LMs: every label after HF's one-position shift is -100). The
  mean loss is then over zero tokens: transformers returns NaN (0/0, and NaN gradients), while the
  engine's cross-entropy returns 0 with zero gradients (spectral_peft.ops.loss). Neither is a
  reference, so the oracle refuses; keep at least one label, or pass ``dlogits`` instead;
- ``--out`` naming a directory, or a file in a directory that does not exist.
"""
from __future__ import annotations

import numpy as np

from .adapters.peft_model import load_peft_model
from .adapters.prefix import PEFT_KEY
from .backend import get_backend, to_host
from .commands.contract import check_out_dir, help_text, run_or_exit2
from .io.safe import check_finite, load_safetensors, save_safetensors
from .model import BertModel, hf_gradients, load_pretrained
from .model.hf import NONFINITE_HINT, read_config

IGNORE_INDEX = -100  # labels HF's cross-entropy ignores
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "dlogits")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="Hugging Face model directory: config.json + model.safetensors or its shards "
                             "(gpt2, bert, llama, mistral, qwen2)")
    parser.add_argument("--adapter", metavar="DIR", default=None,
                        help=help_text("PEFT adapter directory: adapter_config.json + adapter_model.safetensors",
                                       "none: the base model alone"))
    parser.add_argument("--inputs", required=True, metavar="IN.safetensors",
                        help="input_ids, optional attention_mask, token_type_ids, labels, dlogits")
    parser.add_argument("--out", required=True, metavar="OUT.safetensors",
                        help="where logits, loss and grad.<key> are written")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                        help=help_text("compute dtype: float64 or float32", "float64"))
    parser.add_argument("--allow_nonfinite", action="store_true",
                        help=help_text("compute even when a weight is NaN or inf (refused by key otherwise)",
                                       "off", flag=True))


def read_inputs(path, keys=INPUT_KEYS) -> dict:
    """IN.safetensors -> dict of host arrays, every key one of ``keys`` and input_ids present (int)."""
    arrays = load_safetensors(path)
    unknown = sorted(set(arrays) - set(keys))
    if unknown:
        raise ValueError(f"{path}: key {unknown[0]!r} is not an input; expected some of {list(keys)}")
    if "input_ids" not in arrays:
        raise ValueError(f"{path}: key 'input_ids' missing (an int64 (B, T) array is required)")
    for k in ("input_ids", "token_type_ids"):
        if k in arrays and arrays[k].dtype.kind not in "iu":
            raise ValueError(f"{path}: key {k!r} has dtype {arrays[k].dtype}, expected an integer dtype (int64)")
    return arrays


def check_labels_keep_a_token(labels) -> None:
    """Causal-LM labels (B, T): at least one label after HF's shift (labels[:, 1:]) is not -100."""
    if labels is not None and labels.ndim == 2 and labels.dtype.kind in "iu" \
            and not np.any(labels[:, 1:] != IGNORE_INDEX):
        raise ValueError(f"inputs: key 'labels' keeps no token (every label after the one-position shift is "
                         f"{IGNORE_INDEX}): the mean loss over zero tokens is NaN in transformers and 0 in the "
                         "engine, neither a reference; keep at least one label, or pass dlogits instead")


def check_finite_parameters(model, adapter_dir) -> None:
    """Every trainable parameter of a loaded adapter model is finite (NaN/Inf named by its key)."""
    check_finite({name: to_host(m.params[k]) for name, m, k in model.named_parameters(trainable_only=True)},
                 adapter_dir, NONFINITE_HINT)


def reference(model_dir, inputs: dict, adapter_dir=None, dtype: str = "float64", allow_nonfinite: bool = False) -> dict:
    """Compute the oracle's outputs: name -> host array (see the module docstring)."""
    if read_config(model_dir)[0] != "bert":  # causal LMs: (B, T) labels with HF's shift
        check_labels_keep_a_token(inputs.get("labels"))
    backend = get_backend(None, dtype)
    model = load_pretrained(model_dir, backend, allow_nonfinite=allow_nonfinite)
    base = model
    if adapter_dir is not None:
        model = load_peft_model(model, adapter_dir)
        if not allow_nonfinite:
            check_finite_parameters(model, adapter_dir)
    model.eval()  # dropout off
    bare = isinstance(base, BertModel)
    labels = inputs.get("labels")
    labels = labels.astype(np.int64) if labels is not None and labels.dtype.kind in "iu" else labels
    out = model.forward(inputs["input_ids"].astype(np.int64), attention_mask=inputs.get("attention_mask"),
                        labels=labels, token_type_ids=inputs.get("token_type_ids"))
    primary = out.last_hidden_state if bare else out.logits
    result = {("last_hidden_state" if bare else "logits"): to_host(primary)}
    dlogits = inputs.get("dlogits")
    if dlogits is not None and tuple(dlogits.shape) != tuple(primary.shape):
        raise ValueError(f"inputs: key 'dlogits' has shape {tuple(dlogits.shape)}, expected the output's {tuple(primary.shape)}")
    if out.loss is None and dlogits is None:
        return result
    model.zero_grad()
    if dlogits is not None:
        model.backward(backend.asarray(dlogits))
    else:
        model.backward()
    loss = out.loss
    if loss is not None:
        for controller in getattr(model, "controllers", []):
            loss += float(controller.regularize())  # AdaLoRA: orth_reg_weight · R, as PEFT adds it
        result["loss"] = np.array(loss, dtype=np.dtype(dtype))
    if adapter_dir is None:
        grads = hf_gradients(model)
    else:
        grads = {}
        prompt_learning = getattr(model, "prompt_encoder", None) is not None
        for name, m, k in model.named_parameters(trainable_only=True):
            g = m.grads.get(k)
            # prefix / prompt tuning: the one trainable tensor, under its file key prompt_embeddings
            grads[PEFT_KEY if prompt_learning else name] = (to_host(g) if g is not None
                                                             else np.zeros(m.params[k].shape, dtype=np.dtype(dtype)))
    for key, g in grads.items():
        result[f"grad.{key}"] = np.ascontiguousarray(g)
    return result


def main(args) -> int:
    def work():
        check_out_dir(args.out)
        inputs = read_inputs(args.inputs)
        save_safetensors(reference(args.model, inputs, args.adapter, args.dtype, args.allow_nonfinite), args.out)

    return run_or_exit2("reference", work)
