"""The `conformance` command: check an implementation of the contract functions against the
float64 engine (spectral_peft/conformance/, docs/conformance.md).

    spectral-peft conformance TARGET [--only NAME,...] [--dtype float32|float64|float16]
                              [--examples N] [--seed S] [--json OUT]

TARGET: an importable module name or a path to a .py file defining any of the contract functions.
Prints the table (function, cases, worst error per output, tolerance, verdict) and, for each
FAIL, the smallest counterexample. Exit 0 when every function run passes, 1 when any fails, 2 for
a usage error (one line: the module not importable, no contract function in it, a function or a
returned array that breaks the contract).
"""
from __future__ import annotations

import os
import sys

from ..conformance import DEFAULT_EXAMPLES, FUNCTIONS, ContractError, check, write_json
from .contract import check_out_dir, help_text


def add_arguments(parser) -> None:
    parser.add_argument("target", metavar="TARGET", help="a module name or a path to a .py file")
    parser.add_argument("--only", default=None, metavar="NAME,...",
                        help=help_text(f"run only these functions: {', '.join(FUNCTIONS)}", "every one TARGET defines"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16"),
                        help=help_text("the dtype of the arrays TARGET receives", "float32"))
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                        help=help_text("cases drawn per function", DEFAULT_EXAMPLES))
    parser.add_argument("--seed", type=int, default=0, help=help_text("Hypothesis's seed", 0))
    parser.add_argument("--json", default=None, metavar="OUT", help=help_text("also write the report as JSON to OUT", "none: the table only"))


def main(args) -> int:
    try:
        if args.json is not None:
            check_out_dir(args.json)
        only = None if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
        if args.target.endswith(".py") or os.sep in args.target:
            sys.path.insert(0, os.path.dirname(os.path.abspath(args.target)))  # its sibling imports
        report = check(args.target, only=only, dtype=args.dtype, examples=args.examples, seed=args.seed)
    except (ContractError, ValueError) as exc:
        print(f"spectral-peft conformance: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 2
    print(report.table())
    if args.json is not None:
        write_json(report, args.json)
    return 0 if report.passed else 1
