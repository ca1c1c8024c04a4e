"""Sparse storage and products for RoSA: CSR, sp_add, SpMM, SDDMM (NumPy/SciPy and CuPy/cupyx)."""
from .csr import CSR
from .kernels import (SDDMM_IMPLS, SddmmPlan, plan_for, sddmm, sddmm_auto, sddmm_dense, sddmm_planned, sp_add, spmm,
                      spmm_t)

__all__ = ["CSR", "SDDMM_IMPLS", "SddmmPlan", "plan_for", "sddmm", "sddmm_auto", "sddmm_dense", "sddmm_planned", "sp_add",
           "spmm", "spmm_t"]
