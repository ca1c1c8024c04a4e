"""Naive float64 oracles, one loop per equation. Nothing here imports spectral_peft.

Notation: x (N, d_in) as nested index loops, W (d_out, d_in), A (r, d_in), B (d_out, r).
Every function takes and returns NumPy arrays but computes with explicit Python loops.
"""
import math

import numpy as np


def matvec_rows(x, W):
    """y[n][o] = Σ_i x[n][i] · W[o][i]."""
    N, d_in = x.shape
    d_out = W.shape[0]
    y = np.zeros((N, d_out))
    for n in range(N):
        for o in range(d_out):
            acc = 0.0
            for i in range(d_in):
                acc += x[n, i] * W[o, i]
            y[n, o] = acc
    return y


def lora_delta(A, B, scale):
    """ΔW[o][i] = s · Σ_k B[o][k] A[k][i]   (Hu et al. 2021, Eq. 3)."""
    d_out, r = B.shape
    d_in = A.shape[1]
    D = np.zeros((d_out, d_in))
    for o in range(d_out):
        for i in range(d_in):
            D[o, i] = scale * sum(B[o, k] * A[k, i] for k in range(r))
    return D


def lora_forward(x, W, bias, A, B, lora_alpha, use_rslora=False):
    """h = x Wᵀ + b + s · x (B A)ᵀ with s = α/r (or α/√r for rsLoRA)."""
    r = A.shape[0]
    scale = lora_alpha / (math.sqrt(r) if use_rslora else r)
    y = matvec_rows(x, W + lora_delta(A, B, scale))
    if bias is not None:
        for n in range(y.shape[0]):
            for o in range(y.shape[1]):
                y[n, o] += bias[o]
    return y


def dora_forward(x, W, bias, A, B, m, lora_alpha):
    """DoRA (Liu et al. 2024): h = x [m ⊙ (W + s·BA) / ||W + s·BA||_row]ᵀ + b."""
    r = A.shape[0]
    V = W + lora_delta(A, B, lora_alpha / r)
    d_out, d_in = V.shape
    Wd = np.zeros_like(V)
    for o in range(d_out):
        norm = math.sqrt(sum(V[o, i] ** 2 for i in range(d_in)))
        for i in range(d_in):
            Wd[o, i] = m[o] * V[o, i] / norm
    y = matvec_rows(x, Wd)
    if bias is not None:
        y = y + bias
    return y


def dylora_forward(x, W, bias, A, B, lora_alpha, b):
    """DyLoRA (Valipour et al. 2023) at rank b: the first b rows of A, first b columns of B, scale α/b."""
    return lora_forward(x, W, bias, A[:b], B[:, :b], lora_alpha * 1.0)


def delta_lora_update(W, A_old, B_old, A_new, B_new, scale, lam):
    """Delta-LoRA (Zi et al. 2023, Alg. 1): W ← W + λ · s · (B'A' − BA)."""
    return W + lam * (lora_delta(A_new, B_new, scale) - lora_delta(A_old, B_old, scale))


def rosa_forward(x, W, bias, A, B, lora_alpha, sparse_entries):
    """RoSA (Nikdan et al. 2024): h = x (W + S + s·BA)ᵀ + b, S given as {(row, col): value}."""
    S = np.zeros_like(W)
    for (row, col), value in sparse_entries.items():
        S[row, col] = value
    return lora_forward(x, W + S, bias, A, B, lora_alpha)


# --- backward oracles -----------------------------------------------------------------------------
# Each takes the forward's inputs and dy (N, d_out), the gradient of a scalar L with respect to
# the output y, and returns {name: dL/dname} for the input x and every trainable tensor (the base
# W and b are frozen). Every entry is one explicit sum over the indices of the chain rule.

def _grad_x(dy, Weff):
    """dx[n][i] = Σ_o dy[n][o] · Weff[o][i]   (y = x Weffᵀ + b)."""
    N, d_out = dy.shape
    d_in = Weff.shape[1]
    dx = np.zeros((N, d_in))
    for n in range(N):
        for i in range(d_in):
            dx[n, i] = sum(dy[n, o] * Weff[o, i] for o in range(d_out))
    return dx


def _grad_low_rank(x, dy, A, B, scale):
    """The factors of ΔW = s · B A given dL/dΔW[o][i] = Σ_n dy[n][o] x[n][i]:
    dA[k][i] = s Σ_n Σ_o dy[n][o] B[o][k] x[n][i],  dB[o][k] = s Σ_n dy[n][o] Σ_i A[k][i] x[n][i]."""
    N, d_in = x.shape
    d_out, r = B.shape
    dA = np.zeros((r, d_in))
    dB = np.zeros((d_out, r))
    for k in range(r):
        for i in range(d_in):
            dA[k, i] = scale * sum(dy[n, o] * B[o, k] * x[n, i] for n in range(N) for o in range(d_out))
        for o in range(d_out):
            dB[o, k] = scale * sum(dy[n, o] * sum(A[k, i] * x[n, i] for i in range(d_in)) for n in range(N))
    return dA, dB


def lora_backward(x, W, A, B, lora_alpha, dy, use_rslora=False):
    """LoRA, h = x (W + s·BA)ᵀ + b: {"x", "A", "B"}."""
    r = A.shape[0]
    scale = lora_alpha / (math.sqrt(r) if use_rslora else r)
    dA, dB = _grad_low_rank(x, dy, A, B, scale)
    return {"x": _grad_x(dy, W + lora_delta(A, B, scale)), "A": dA, "B": dB}


def dora_backward(x, W, A, B, m, lora_alpha, dy):
    """DoRA with the row norm c[o] = ||V[o]||, V = W + s·BA, treated as a constant (Liu et al. 2024,
    §4.3; PEFT detaches it): h[n][o] = m[o]/c[o] · Σ_i x[n][i] V[o][i] + b[o]. {"x", "A", "B", "m"}:
    dm[o] = Σ_n dy[n][o] (Σ_i x[n][i] V[o][i]) / c[o]; dV[o][i] = Σ_n dy[n][o] m[o]/c[o] x[n][i],
    then dA, dB from dV through V = W + s·BA."""
    r = A.shape[0]
    scale = lora_alpha / r
    V = W + lora_delta(A, B, scale)
    N, d_in = x.shape
    d_out = V.shape[0]
    c = [math.sqrt(sum(V[o, i] ** 2 for i in range(d_in))) for o in range(d_out)]
    g = [m[o] / c[o] for o in range(d_out)]
    dm = np.zeros(d_out)
    for o in range(d_out):
        dm[o] = sum(dy[n, o] * sum(x[n, i] * V[o, i] for i in range(d_in)) for n in range(N)) / c[o]
    dyg = np.zeros_like(dy)  # dL/d(x Vᵀ)[n][o] = dy[n][o] · m[o]/c[o]
    for n in range(N):
        for o in range(d_out):
            dyg[n, o] = dy[n, o] * g[o]
    Wd = np.zeros_like(V)
    for o in range(d_out):
        for i in range(d_in):
            Wd[o, i] = g[o] * V[o, i]
    dA, dB = _grad_low_rank(x, dyg, A, B, scale)
    return {"x": _grad_x(dy, Wd), "A": dA, "B": dB, "m": dm}


def adalora_scale(r, lora_alpha, ranknum):
    """PEFT's SVDLinear factor: (lora_alpha if lora_alpha > 0 else r) / (ranknum + 1e-5)."""
    return (lora_alpha if lora_alpha > 0 else r) / (ranknum + 1e-5)


def _adalora_AE(A, E):
    """A'[k][i] = A[k][i] · E[k]: Λ Q with Λ = diag(E)."""
    AE = np.zeros_like(A)
    for k in range(A.shape[0]):
        for i in range(A.shape[1]):
            AE[k, i] = A[k, i] * E[k, 0]
    return AE


def adalora_forward(x, W, bias, A, E, B, lora_alpha, ranknum):
    """AdaLoRA (Zhang et al. 2023, Eq. 3): h = x (W + s · P Λ Q)ᵀ + b with P = B (d_out, r),
    Λ = diag(E) (E (r, 1)), Q = A (r, d_in), s = adalora_scale."""
    scale = adalora_scale(A.shape[0], lora_alpha, ranknum)
    y = matvec_rows(x, W + lora_delta(_adalora_AE(A, E), B, scale))
    if bias is not None:
        y = y + bias
    return y


def adalora_backward(x, W, A, E, B, lora_alpha, ranknum, dy):
    """AdaLoRA: {"x", "A", "E", "B"}. With A'[k][i] = A[k][i] E[k]: dA' and dB as LoRA's factors,
    dA[k][i] = dA'[k][i] E[k], dE[k] = Σ_i dA'[k][i] A[k][i]."""
    r, d_in = A.shape
    scale = adalora_scale(r, lora_alpha, ranknum)
    AE = _adalora_AE(A, E)
    dAE, dB = _grad_low_rank(x, dy, AE, B, scale)
    dA = np.zeros_like(A)
    dE = np.zeros_like(E)
    for k in range(r):
        for i in range(d_in):
            dA[k, i] = dAE[k, i] * E[k, 0]
        dE[k, 0] = sum(dAE[k, i] * A[k, i] for i in range(d_in))
    return {"x": _grad_x(dy, W + lora_delta(AE, B, scale)), "A": dA, "E": dE, "B": dB}


def rosa_backward(x, W, A, B, lora_alpha, sparse_entries, dy):
    """RoSA, h = x (W + S + s·BA)ᵀ + b: {"x", "A", "B", "S"}, "S" a dict {(row, col): dL/dS[row][col]}
    with dS[row][col] = Σ_n dy[n][row] x[n][col] on the support only."""
    r = A.shape[0]
    scale = lora_alpha / r
    Weff = W + lora_delta(A, B, scale)
    for (row, col), value in sparse_entries.items():
        Weff[row, col] += value
    dA, dB = _grad_low_rank(x, dy, A, B, scale)
    dS = {(row, col): sum(dy[n, row] * x[n, col] for n in range(x.shape[0])) for (row, col) in sparse_entries}
    return {"x": _grad_x(dy, Weff), "A": dA, "B": dB, "S": dS}


def adalora_budget(step, init_r, target_r, n_matrices, tinit, tfinal, total_step):
    """AdaLoRA's cubic budget b(t) (Zhang et al. 2023, Eq. 14, with the numerator t − t_i used by
    both public codebases)."""
    b0 = init_r * n_matrices
    bT = target_r * n_matrices
    if step <= tinit:
        return b0
    if step > total_step - tfinal:
        return bT
    progress = (step - tinit) / (total_step - tfinal - tinit)
    return int((b0 - bT) * (1 - progress) ** 3 + bT)


def adalora_triplet_scores(sE, sA, sB):
    """S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)  (Eq. 9). sE (r,), sA (r, d_in), sB (d_out, r)."""
    r = sE.shape[0]
    out = np.zeros(r)
    for i in range(r):
        mean_a = sum(sA[i, j] for j in range(sA.shape[1])) / sA.shape[1]
        mean_b = sum(sB[k, i] for k in range(sB.shape[0])) / sB.shape[0]
        out[i] = sE[i] + mean_a + mean_b
    return out


def _normal_ppf(p):
    """Φ⁻¹(p) by bisection on math.erf: independent of scipy."""
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def nf4_codebook(offset=0.9677083):
    """QLoRA's NF4 (Dettmers et al. 2023, Appendix / bitsandbytes create_normal_map): 8 positive
    quantiles of linspace(offset, 0.5, 9)[:-1], 7 negative of linspace(offset, 0.5, 8)[:-1], and 0,
    sorted and divided by the largest magnitude."""
    pos = [_normal_ppf(offset + (0.5 - offset) * k / 8) for k in range(8)]
    neg = [-_normal_ppf(offset + (0.5 - offset) * k / 7) for k in range(7)]
    values = sorted(pos + neg + [0.0])
    top = max(abs(v) for v in values)
    return [v / top for v in values]


def blockwise_quantize(values, codebook, blocksize):
    """Absmax blockwise quantisation of a flat list: per block absmax, each value → the index of the
    nearest codebook entry to value/absmax (first index on exact ties). Returns (codes, absmax)."""
    codes, absmaxes = [], []
    for start in range(0, len(values), blocksize):
        block = values[start:start + blocksize]
        absmax = max(abs(v) for v in block)
        absmaxes.append(absmax)
        for v in block:
            scaled = v / absmax if absmax > 0 else 0.0
            best, best_err = 0, float("inf")
            for idx, c in enumerate(codebook):
                err = abs(scaled - c)
                if err < best_err:
                    best, best_err = idx, err
            codes.append(best)
    return codes, absmaxes
