"""The `generate` command: KV-cache generation from a Hugging Face causal LM (gpt2, llama, mistral,
qwen2) and an optional PEFT adapter, merged into the base or computed at every step.

    spectral-peft generate --model DIR [--adapter DIR] [--merge] --inputs IN.safetensors
                           --max_new_tokens N --out OUT.safetensors [--dtype float64|float32]
                           [--do_sample --temperature T --top_k K --top_p P --seed S]
                           [--eos_token_id E --pad_token_id P]

IN holds ``input_ids`` (B, T) int and optional ``attention_mask`` (B, T) 0/1, left-padded. OUT
holds ``sequences`` (B, T+n) int64 and ``logits`` (B, n, V), the logits each new token was chosen
from; n = N unless --eos_token_id finished every row sooner. Greedy unless --do_sample
(spectral_peft/generation.py). Any error: one line on stderr, exit status 2, no OUT file; a
checkpoint with NaN or Inf weights is refused by key unless --allow_nonfinite.
"""
from __future__ import annotations

from ..adapters.peft_model import load_peft_model, merge_and_unload
from ..backend import get_backend
from ..generation import generate
from ..io.safe import save_safetensors
from ..model import load_pretrained
from ..oracle import read_inputs
from .contract import check_out_dir, help_text, run_or_exit2

GENERATE_INPUT_KEYS = ("input_ids", "attention_mask")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="Hugging Face causal LM directory (gpt2, llama, mistral, qwen2)")
    parser.add_argument("--adapter", metavar="DIR", default=None, help=help_text("PEFT adapter directory", "none: the base model alone"))
    parser.add_argument("--merge", action="store_true",
                        help=help_text("merge the adapter into the base weights first", "off: the adapter computed at "
                                       "every step", flag=True))
    parser.add_argument("--inputs", required=True, metavar="IN.safetensors",
                        help="input_ids (B, T) and optional attention_mask, left-padded")
    parser.add_argument("--max_new_tokens", required=True, type=int, metavar="N", help="tokens to generate")
    parser.add_argument("--out", required=True, metavar="OUT.safetensors", help="where sequences and logits go")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                        help=help_text("compute dtype: float64 or float32", "float64"))
    parser.add_argument("--allow_nonfinite", action="store_true",
                        help=help_text("load a checkpoint with NaN or Inf weights (refused by key otherwise)", "off",
                                       flag=True))
    parser.add_argument("--do_sample", action="store_true", help=help_text("sample instead of greedy decoding", "off: greedy", flag=True))
    parser.add_argument("--temperature", type=float, default=1.0, help=help_text("sampling: logits / T", 1))
    parser.add_argument("--top_k", type=int, default=None, help=help_text("sampling: keep the K most likely tokens", "none: every token"))
    parser.add_argument("--top_p", type=float, default=None, help=help_text("sampling: nucleus mass P in (0, 1]", "none: no nucleus cut"))
    parser.add_argument("--seed", type=int, default=0, help=help_text("sampling: the generator's seed", 0))
    parser.add_argument("--eos_token_id", type=int, default=None,
                        help=help_text("stop a row at this token", "none: exactly N new tokens"))
    parser.add_argument("--pad_token_id", type=int, default=None,
                        help=help_text("the token after a row has finished", "the eos id"))


def main(args) -> int:
    def work():
        check_out_dir(args.out)
        if args.merge and args.adapter is None:
            raise ValueError("--merge needs --adapter DIR (there is nothing to merge)")
        inputs = read_inputs(args.inputs, GENERATE_INPUT_KEYS)
        model = load_pretrained(args.model, get_backend(None, args.dtype), allow_nonfinite=args.allow_nonfinite)
        if args.adapter is not None:
            model = load_peft_model(model, args.adapter)
            if args.merge:
                model = merge_and_unload(model)
        out = generate(model, inputs["input_ids"], inputs.get("attention_mask"), max_new_tokens=args.max_new_tokens,
                       do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, eos_token_id=args.eos_token_id, pad_token_id=args.pad_token_id)
        save_safetensors({"sequences": out.sequences, "logits": out.logits}, args.out)
        B, n = out.logits.shape[:2]
        print(f"generated {n} tokens for {B} sequences; KV cache {out.cache_bytes} bytes")

    return run_or_exit2("generate", work)
