"""The `spectral-peft` console script: run, figures, reference, generate, conformance, validate.

Each command lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int``; this file only dispatches. Bad arguments exit with status 2 and one line.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .backend import tune_host_allocator

COMMANDS = {
    "run": ("spectral_peft.commands.run", "fine-tune every method on the embedded default and compare them"),
    "figures": ("spectral_peft.figures", "regenerate every figure from a run's results, into that run's folder (or --out)"),
    "reference": ("spectral_peft.oracle", "write reference logits, loss and gradients (float64)"),
    "generate": ("spectral_peft.commands.generate", "KV-cache generation from a causal LM and an optional adapter"),
    "conformance": ("spectral_peft.commands.conformance",
                    "check your implementation of the contract functions against the float64 engine"),
    "validate": ("spectral_peft.validate", "side-by-side checks against the installed peers"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and exit status 2, as every command promises for bad input.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spectral-peft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_host_allocator()
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
