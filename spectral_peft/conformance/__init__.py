"""`spectral-peft conformance`: check someone else's implementation of the contract functions
(LoRA, DoRA, AdaLoRA, RoSA layers; attention, RMSNorm, RoPE, SwiGLU, cross-entropy; 4-bit
quantisation; AdaLoRA's budget) against the float64 engine, on cases Hypothesis draws.

    from spectral_peft.conformance import check
    report = check("my_kernels", dtype="float32")      # a module, a module name or a .py path
    print(report.table()); report.passed

See docs/conformance.md for the contract, the tolerance table and how to read a counterexample.
"""
from .cases import make_case
from .suite import CONTRACT, DEFAULT_EXAMPLES, FUNCTIONS, TOLERANCES, ContractError, Report, Result, check, write_json

__all__ = ["CONTRACT", "ContractError", "DEFAULT_EXAMPLES", "FUNCTIONS", "Report", "Result", "TOLERANCES", "check",
           "make_case", "write_json"]
