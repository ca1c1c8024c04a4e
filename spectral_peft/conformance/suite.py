"""The conformance suite: draw cases, call the target, compare with the float64 oracle, report.

For each contract function the target defines, Hypothesis draws specs (cases.py); each spec is
built into keyword arguments in the chosen dtype and passed to the target; the oracle (oracle.py)
computes the answer in float64 from those same arrays, so the rounding of the inputs is never
counted as the target's error. Each returned array is compared by its scale-relative error

    err = max |got − expected| / max(max |expected|, natural scale)   (compared entries; NaN/inf: inf)

(the natural scale only where a softmax can saturate: natural_scales) against the tolerance of
the function and dtype (TOLERANCES; docs/conformance.md gives the
reasoning); the exact functions (4-bit quantisation, the budget) must match bit for bit, and
their error is the fraction of elements that differ. On a failure Hypothesis shrinks the case;
the report keeps the smallest counterexample.

A target that breaks the contract (no such function, a signature that does not take the
arguments, a missing output, a wrong shape or dtype) raises ContractError: a usage error, not a
verdict.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed

from ..io.safe import atomic_write_bytes
from . import oracle
from .cases import BUILDERS, FLOAT_DTYPES, STRATEGIES, visible_keys

# function -> (arguments, outputs) as the contract states them
CONTRACT = {
    "lora": (("x", "weight", "bias", "lora_A", "lora_B", "scaling", "grad_output"),
             ("output", "grad_x", "grad_lora_A", "grad_lora_B")),
    "dora": (("x", "weight", "bias", "lora_A", "lora_B", "lora_magnitude", "scaling", "grad_output"),
             ("output", "grad_x", "grad_lora_A", "grad_lora_B", "grad_lora_magnitude")),
    "adalora": (("x", "weight", "bias", "lora_A", "lora_E", "lora_B", "scaling", "ranknum", "grad_output"),
                ("output", "grad_x", "grad_lora_A", "grad_lora_E", "grad_lora_B")),
    "rosa": (("x", "weight", "bias", "lora_A", "lora_B", "scaling", "sparse_indptr", "sparse_indices",
              "sparse_values", "grad_output"), ("output", "grad_x", "grad_lora_A", "grad_lora_B", "grad_sparse_values")),
    "attention": (("q", "k", "v", "causal", "key_padding_mask", "grad_output"), ("output", "grad_q", "grad_k", "grad_v")),
    "rmsnorm": (("x", "weight", "eps", "grad_output"), ("output", "grad_x", "grad_weight")),
    "rope": (("x", "position_ids", "inv_freq", "grad_output"), ("output", "grad_x")),
    "swiglu": (("gate", "up", "grad_output"), ("output", "grad_gate", "grad_up")),
    "cross_entropy": (("logits", "labels", "grad_output"), ("output", "grad_logits")),
    "quantize_4bit": (("weight", "blocksize", "quant_type"), ("packed", "absmax")),
    "dequantize_4bit": (("packed", "absmax", "blocksize", "quant_type", "shape"), ("weight",)),
    "adalora_budget": (("step", "init_budget", "target_budget", "tinit", "tfinal", "total_step"), ("budget",)),
}
FUNCTIONS = tuple(CONTRACT)
EXACT = {"quantize_4bit": {"packed": np.uint8, "absmax": np.float32}, "dequantize_4bit": {"weight": np.float32},
         "adalora_budget": {"budget": None}}  # output -> required dtype (None: any integer)

# Scale-relative tolerances per dtype (docs/conformance.md): float64 leaves room for the order of
# summation only; float32 and float16 for a few roundings per output of a well-conditioned
# computation (unit roundoff 6e-8 and 5e-4) times the reduction lengths the cases draw, more where
# a softmax, a norm or the rotation angles amplify input rounding.
_F32 = {"attention": 1e-4, "dora": 1e-4, "cross_entropy": 1e-4}
_F16 = {"attention": 2e-2, "dora": 5e-2, "cross_entropy": 2e-2, "rope": 2e-2}
TOLERANCES = {name: {"float64": 1e-10, "float32": _F32.get(name, 2e-5), "float16": _F16.get(name, 1e-2)}
              for name in FUNCTIONS if name not in EXACT}
DEFAULT_EXAMPLES = 100


def _amax(a) -> float:
    return float(np.max(np.abs(a))) if a is not None and np.size(a) else 0.0


def natural_scales(name: str, kw: dict) -> dict:
    """output -> the magnitude the output has when nothing saturates, from the inputs alone.

    Where a softmax saturates or a sum cancels, an output's true values can all be far below it
    (dS ≈ 0 makes attention's dq, dk tiny; a confident correct prediction makes the loss and
    dlogits tiny; RMSNorm's dx cancels for C = 1; a gradient summed over tokens can cancel to ~0;
    for the multilinear layers the scale is the oracle on |inputs|, the sum of |terms| that bounds
    every rounding error, as in the classic bound |fl(Σ t) − Σ t| <= γ_n Σ |t|):
    there even the float64 oracle's absolute rounding (p − 1 at the label) and a correct float16
    result (0) are wrong in relative terms. The error is then measured against this scale."""
    if name == "attention":
        D = kw["q"].shape[-1]
        dO, q, k, v = (_amax(kw[n]) for n in ("grad_output", "q", "k", "v"))
        return {"grad_q": dO * v * k / np.sqrt(D), "grad_k": dO * v * q / np.sqrt(D)}
    if name in ("lora", "adalora", "rosa"):  # multilinear: the same sums of |terms| bound each output
        absolute = {k: (np.abs(v) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v) for k, v in kw.items()}
        return {k: _amax(v) for k, v in getattr(oracle, name)(**absolute).items()}
    if name == "dora":  # dm_i = Σ_n dy_ni v_ni / n_i can cancel to ~0 (d_out = 1: one sum)
        x, W, A, B = kw["x"], kw["weight"], kw["lora_A"], kw["lora_B"]
        V = W + kw["scaling"] * (B @ A)
        v = x @ V.T  # (N, d_out)
        terms = (np.abs(kw["grad_output"]) * np.abs(v)).sum(axis=0) / np.sqrt((V * V).sum(axis=1))
        return {"grad_lora_magnitude": _amax(terms)}
    if name == "rmsnorm":  # dx = r·(g − x̂·mean(g ⊙ x̂)) cancels to ~0 where C = 1; dw = Σ_n dy x̂ can too
        x = kw["x"]
        r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + kw["eps"])  # (N, 1)
        return {"grad_x": _amax(kw["grad_output"]) * _amax(kw["weight"]) * _amax(r),
                "grad_weight": _amax((np.abs(kw["grad_output"]) * np.abs(x * r)).sum(axis=0))}
    if name == "cross_entropy":
        kept = max(int(np.sum(kw["labels"] != -100)), 1)
        return {"output": 1.0, "grad_logits": _amax(kw["grad_output"]) / kept}
    return {}


class ContractError(ValueError):
    """The target does not keep the contract (a usage error: exit status 2)."""


@dataclass
class Result:
    function: str
    verdict: str  # PASS, FAIL or "not run"
    cases: int = 0
    worst: dict = field(default_factory=dict)  # output -> worst error
    tolerance: float | None = None
    counterexample: dict | None = None

    def to_json(self) -> dict:
        return {"function": self.function, "verdict": self.verdict, "cases": self.cases,
                "worst": {k: (None if not np.isfinite(v) else float(v)) for k, v in self.worst.items()},
                "tolerance": self.tolerance, "counterexample": None if self.counterexample is None else {
                    k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                    for k, v in self.counterexample.items()}}


@dataclass
class Report:
    target: str
    dtype: str
    examples: int
    seed: int
    results: list

    @property
    def passed(self) -> bool:
        return all(r.verdict != "FAIL" for r in self.results)

    def to_json(self) -> dict:
        return {"target": self.target, "dtype": self.dtype, "examples": self.examples, "seed": self.seed,
                "passed": self.passed, "results": [r.to_json() for r in self.results]}

    def table(self) -> str:
        worsts = [", ".join(f"{k} {_fmt(v)}" for k, v in r.worst.items()) or "-" for r in self.results]
        w = max(len("worst error per output"), *map(len, worsts))
        lines = [f"conformance of {self.target} in {self.dtype} ({self.examples} examples per function, seed {self.seed})",
                 f"{'function':<16}{'cases':>6}  {'worst error per output':<{w}}{'tolerance':>11}  verdict"]
        for r, worst in zip(self.results, worsts):
            tol = "exact" if r.function in EXACT else ("-" if r.tolerance is None else f"{r.tolerance:.0e}")
            lines.append(f"{r.function:<16}{r.cases:>6}  {worst:<{w}}{tol:>11}  {r.verdict}")
        for r in self.results:
            if r.counterexample:
                c = r.counterexample
                lines.append(f"\n{r.function} FAIL: {c['output']} error {_fmt(c['error'])} > tolerance "
                             f"{'exact' if r.function in EXACT else c['tolerance']} ({self.dtype})")
                lines.append(f"  inputs: {c['inputs']}")
                lines.append("  reproduce:")
                lines.append("    from spectral_peft.conformance import make_case")
                lines.append(f"    kwargs = make_case({r.function!r}, {self.dtype!r}, {c['spec']!r})")
                lines.append(f"    out = target.{r.function}(**kwargs)  # out[{c['output']!r}] is off")
                if c.get("raised"):
                    lines.append(f"  the target raised: {c['raised']}")
        return "\n".join(lines)


def _fmt(v: float) -> str:
    return "inf" if not np.isfinite(v) else f"{v:.1e}"


# ------------------------------------------------------------------------------------------------
# the target
# ------------------------------------------------------------------------------------------------
def load_target(target):
    """A module object, an importable module name, or a path to a .py file -> the module."""
    if inspect.ismodule(target):
        return target
    if not isinstance(target, str) or not target:
        raise ContractError(f"TARGET must be a module name or a path to a .py file, got {target!r}")
    try:
        if target.endswith(".py") or os.sep in target:
            if not os.path.isfile(target):
                raise ContractError(f"TARGET {target}: no such file")
            name = "conformance_target_" + os.path.splitext(os.path.basename(target))[0]
            spec = importlib.util.spec_from_file_location(name, target)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(target)
    except ContractError:
        raise
    except Exception as exc:  # an import that fails is the user's module failing: say how, exit 2
        raise ContractError(f"TARGET {target} could not be imported: {type(exc).__name__}: {exc}") from None


def check_signature(name: str, fn) -> None:
    args, _ = CONTRACT[name]
    try:
        inspect.signature(fn).bind(**{a: None for a in args})
    except TypeError as exc:
        raise ContractError(f"{name}: the signature {inspect.signature(fn)} does not take the contract's keyword "
                            f"arguments ({', '.join(args)}): {exc}") from None
    except ValueError:  # no signature (a builtin): it is called and judged by what it returns
        pass


def _as_float64(kwargs: dict) -> dict:
    return {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
            for k, v in kwargs.items()}


def _check_outputs(name: str, got, expected: dict, dtype: str) -> dict:
    if not isinstance(got, dict):
        raise ContractError(f"{name} must return a dict of NumPy arrays, got {type(got).__name__}")
    out = {}
    for key, e in expected.items():
        if key not in got:
            raise ContractError(f"{name} returned no {key!r} (it returned {sorted(got)}); the contract needs "
                                f"{list(expected)}")
        a = got[key]
        if isinstance(a, (int, float, np.generic)):
            a = np.asarray(a)
        if not isinstance(a, np.ndarray):
            raise ContractError(f"{name}: {key!r} must be a NumPy array, got {type(a).__name__} (convert with .numpy() "
                                "or np.asarray)")
        if name == "quantize_4bit" and key == "packed" and a.shape == e.shape + (1,):
            a = a.reshape(e.shape)  # bitsandbytes returns packed codes as (ceil(n/2), 1)
        if a.shape != e.shape:
            raise ContractError(f"{name}: {key!r} has shape {a.shape}, expected {e.shape}")
        want = EXACT.get(name, {}).get(key, "input") if name in EXACT else np.dtype(dtype)
        if want is None:
            if a.dtype.kind not in "iu":
                raise ContractError(f"{name}: {key!r} has dtype {a.dtype}, expected an integer dtype")
        elif want != "input" and a.dtype != np.dtype(want):
            raise ContractError(f"{name}: {key!r} has dtype {a.dtype}, expected {np.dtype(want)}")
        out[key] = a
    return out


def _error(name: str, key: str, a: np.ndarray, e: np.ndarray, kwargs: dict, natural: dict) -> float:
    if name in EXACT:  # bit for bit: float outputs compared by their bit patterns
        if a.dtype.kind == "f":
            bits = np.dtype(f"u{a.itemsize}")
            a, e = a.view(bits), e.astype(a.dtype).view(bits)
        return float(np.mean(a != e)) if a.size else 0.0
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    if name == "attention" and key in ("output", "grad_q"):
        q = kwargs["q"]
        seen = visible_keys(kwargs["causal"], kwargs["key_padding_mask"], q.shape[0], q.shape[2])  # (B, T)
        keep = np.broadcast_to(seen[:, None, :, None], a64.shape)
        a64, e64 = a64[keep], e64[keep]
    if a64.size == 0:
        return 0.0
    if not np.all(np.isfinite(a64)):
        return float("inf")
    scale = max(float(np.max(np.abs(e64))), natural.get(key, 0.0))
    diff = float(np.max(np.abs(a64 - e64)))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _describe(kwargs: dict) -> str:
    parts = []
    for k, v in kwargs.items():
        if isinstance(v, np.ndarray):
            parts.append(f"{k} {v.dtype}{list(v.shape)}")
        else:
            parts.append(f"{k}={v!r}")
    return ", ".join(parts)


class _Mismatch(Exception):
    pass


def run_function(name: str, fn, dtype: str, examples: int, seed: int) -> Result:
    """Draw ``examples`` cases of ``name``, compare, shrink a failure; -> its Result."""
    check_signature(name, fn)
    reference = getattr(oracle, name)
    tol = TOLERANCES[name][dtype] if name in TOLERANCES else 0.0
    res = Result(name, "PASS", tolerance=None if name in EXACT else tol)
    state = {"last_failure": None, "usage": None}

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False, print_blob=False,
              phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck),
              verbosity=Verbosity.quiet)
    @given(spec=STRATEGIES[name])
    def prop(spec):
        if state["usage"] is not None:
            return  # the contract is broken: finish quickly, report the usage error
        kwargs = BUILDERS[name](spec, dtype)
        expected = reference(**_as_float64(kwargs))
        res.cases += 1
        failure = {"spec": spec, "tolerance": tol, "inputs": _describe(kwargs)}
        try:
            got = fn(**{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()})
        except Exception as exc:  # the target failing on a case is a verdict on that case
            failure.update(output="(raised)", error=float("inf"), raised=f"{type(exc).__name__}: {exc}"[:300])
            res.worst["(raised)"] = float("inf")
        else:
            try:
                got = _check_outputs(name, got, expected, dtype)
            except ContractError as exc:
                state["usage"] = exc
                return
            natural = natural_scales(name, _as_float64(kwargs))
            for key in expected:
                err = _error(name, key, got[key], np.asarray(expected[key]), kwargs, natural)
                res.worst[key] = max(res.worst.get(key, 0.0), err)
                if err > tol and err > failure.get("error", -1.0):
                    failure.update(output=key, error=err)
        if "output" in failure:
            state["last_failure"] = failure
            raise _Mismatch()  # the one place a case fails: Hypothesis shrinks it

    try:
        prop()
    except _Mismatch:
        pass
    if state["usage"] is not None:
        raise state["usage"]
    if state["last_failure"] is not None:
        res.verdict = "FAIL"
        res.counterexample = dict(state["last_failure"])
    res.worst = {k: res.worst[k] for k in CONTRACT[name][1] if k in res.worst} | (
        {"(raised)": res.worst["(raised)"]} if "(raised)" in res.worst else {})
    return res


def check(target, only=None, dtype: str = "float32", examples: int | None = None, seed: int = 0) -> Report:
    """Run the suite on ``target`` (a module, a module name or a .py path) -> Report.

    only: function names to run (default: every contract function the target defines). Raises
    ContractError for usage errors (nothing importable, no contract function, a function or
    output that breaks the contract, an unknown name in ``only``, a bad dtype or count)."""
    if dtype not in FLOAT_DTYPES:
        raise ContractError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    examples = DEFAULT_EXAMPLES if examples is None else examples
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ContractError(f"--examples must be an integer >= 1, got {examples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ContractError(f"--seed must be an integer >= 0, got {seed!r}")
    names = list(FUNCTIONS) if only is None else list(only)
    unknown = [n for n in names if n not in CONTRACT]
    if unknown:
        raise ContractError(f"--only: {unknown[0]!r} is not a contract function; they are: {', '.join(FUNCTIONS)}")
    module = load_target(target)
    defined = {n: getattr(module, n) for n in names if callable(getattr(module, n, None))}
    if not defined:
        raise ContractError(f"TARGET {getattr(module, '__name__', target)} defines none of "
                            f"{'the functions asked for' if only else 'the contract functions'}: {', '.join(names)}")
    for n, fn in defined.items():
        check_signature(n, fn)
    results = [run_function(n, defined[n], dtype, examples, seed) if n in defined else Result(n, "not run")
               for n in names]
    return Report(getattr(module, "__name__", str(target)), dtype, examples, seed, results)


def write_json(report: Report, path) -> None:
    atomic_write_bytes(path, (json.dumps(report.to_json(), indent=1) + "\n").encode())
