"""The engine's hand-written backward passes against reference/naive.py's backward oracles
(explicit loops over the chain rule's indices, sharing no code with spectral_peft), in float64:
dL/dx and dL/d(every trainable tensor) for LoRA/rsLoRA, DoRA, AdaLoRA and RoSA, given the same
dy. Tolerance: rtol 1e-12 relative to each tensor's scale (spectral_peft.testing.assert_close);
the two sides differ only in summation order. Also AdaLoRA's importance scores against the
paper's triplet-score oracle, with beta1 != beta2."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from reference import naive
from spectral_peft.adapters.adalora import AdaLoraConfig, AdaLoraController, AdaLoraLinear
from spectral_peft.adapters.dora import M_KEY, DoraLinear
from spectral_peft.adapters.lora import A_KEY, B_KEY, LoraLinear
from spectral_peft.adapters.rosa import VALUES_KEY, RosaLinear
from spectral_peft.module import Linear
from spectral_peft.testing import assert_close
from tests._nets import Bag

RTOL64 = 1e-12
shapes = dict(n=st.integers(1, 4), d_in=st.integers(1, 6), d_out=st.integers(1, 6), seed=st.integers(0, 2**16))


def _case(seed, n, d_in, d_out):
    """A frozen base (W, b), an input x and the output gradient dy."""
    rng = np.random.default_rng(seed)
    W, b = rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out)
    base = Linear(W.copy(), b.copy())
    base.freeze()
    return rng, base, W, rng.standard_normal((n, d_in)), rng.standard_normal((n, d_out))


def _engine_grads(layer, x, dy, names):
    layer.zero_grad()
    layer.forward(x)
    grads = {"x": layer.backward(dy)}
    grads.update({short: layer.grads[key] for short, key in names.items()})
    return grads


def _compare(method, got, expected):
    assert set(got) == set(expected), (method, sorted(got), sorted(expected))
    for name, e in expected.items():
        assert_close(got[name], e, f"{method} d{name}", RTOL64)


@given(**shapes, r=st.integers(1, 3), rs=st.booleans())
def test_lora_backward_equals_the_loop_oracle(n, d_in, d_out, seed, r, rs):
    rng, base, W, x, dy = _case(seed, n, d_in, d_out)
    r = min(r, d_in, d_out)  # (r above min(d_in, d_out) is PEFT's to allow; it is not this test's subject)
    layer = LoraLinear(base, r=r, lora_alpha=3.0, use_rslora=rs, rng=rng, init_lora_weights=False)
    p = layer.params
    expected = naive.lora_backward(x, W, p[A_KEY], p[B_KEY], 3.0, dy, use_rslora=rs)
    _compare("lora", _engine_grads(layer, x, dy, {"A": A_KEY, "B": B_KEY}), expected)


@given(**shapes, r=st.integers(1, 3))
def test_dora_backward_equals_the_loop_oracle(n, d_in, d_out, seed, r):
    rng, base, W, x, dy = _case(seed, n, d_in, d_out)
    r = min(r, d_in, d_out)
    layer = DoraLinear(base, r=r, lora_alpha=2.0, rng=rng, init_lora_weights=False)
    layer.params[M_KEY][...] = rng.uniform(0.5, 2.0, d_out)  # away from ||W + s·BA||: m acts
    p = layer.params
    expected = naive.dora_backward(x, W, p[A_KEY], p[B_KEY], p[M_KEY], 2.0, dy)
    _compare("dora", _engine_grads(layer, x, dy, {"A": A_KEY, "B": B_KEY, "m": M_KEY}), expected)


@given(**shapes, r=st.integers(1, 3), ranknum=st.integers(1, 5), lora_alpha=st.sampled_from([0.0, 8.0, 2.5]))
def test_adalora_backward_equals_the_loop_oracle(n, d_in, d_out, seed, r, ranknum, lora_alpha):
    rng, base, W, x, dy = _case(seed, n, d_in, d_out)
    layer = AdaLoraLinear(base, r=r, lora_alpha=lora_alpha, ranknum=ranknum, rng=rng, init_lora_weights=False)
    p = layer.params
    assert_close(layer.forward(x), naive.adalora_forward(x, W, base.params["bias"], p["lora_A"], p["lora_E"],
                                                         p["lora_B"], lora_alpha, ranknum), "adalora y", RTOL64)
    expected = naive.adalora_backward(x, W, p["lora_A"], p["lora_E"], p["lora_B"], lora_alpha, ranknum, dy)
    got = _engine_grads(layer, x, dy, {"A": "lora_A", "E": "lora_E", "B": "lora_B"})
    _compare("adalora", got, expected)


@given(**shapes, r=st.integers(1, 3), density=st.sampled_from([0.2, 0.5, 1.0]))
def test_rosa_backward_equals_the_loop_oracle(n, d_in, d_out, seed, r, density):
    rng, base, W, x, dy = _case(seed, n, d_in, d_out)
    layer = RosaLinear(base, r=r, d=density, lora_alpha=2.0, rng=rng, init_lora_weights=False)
    entries = {}
    if layer.nnz:
        mask = np.zeros(d_out * d_in, dtype=bool)
        mask[rng.permutation(d_out * d_in)[: layer.nnz]] = True
        mask = mask.reshape(d_out, d_in)
        layer.set_support(mask)
        layer.params[VALUES_KEY][...] = rng.standard_normal(layer.nnz)
        # CSR order is row-major over the support: pair each value with its (row, col)
        entries = dict(zip(map(tuple, np.argwhere(mask)), layer.params[VALUES_KEY]))
    A, B = layer.params["rosa_A.weight"], layer.params["rosa_B.weight"]
    expected = naive.rosa_backward(x, W, A, B, 2.0, entries, dy)
    dS = expected.pop("S")
    got = _engine_grads(layer, x, dy, {"A": "rosa_A.weight", "B": "rosa_B.weight"})
    _compare("rosa", got, expected)
    if entries:
        assert_close(layer.grads[VALUES_KEY], np.array([dS[k] for k in entries]), "rosa dS (support values)", RTOL64)


betas = st.tuples(st.floats(0.05, 0.99), st.floats(0.05, 0.99)).filter(lambda b: b[0] != b[1])


@given(beta=betas, steps=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_adalora_importance_scores_equal_the_papers_triplet_scores(beta, steps, seed):
    """Ī ← β1 Ī + (1 − β1)|θ g|, Ū ← β2 Ū + (1 − β2)|I − Ī| (the updated Ī), s = Ī·Ū, written out
    here; S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki) from reference/naive.py (paper Eq. 9)."""
    beta1, beta2 = beta
    rng = np.random.default_rng(seed)
    dims = [(3, 2), (4, 5)]
    layers = [AdaLoraLinear(Linear(rng.standard_normal((d_out, d_in))), r=3, lora_alpha=8, ranknum=3, rng=rng,
                            init_lora_weights=False) for d_in, d_out in dims]
    cfg = AdaLoraConfig(target_modules=["l0", "l1"], init_r=3, target_r=1, total_step=10, beta1=beta1, beta2=beta2)
    ctl = AdaLoraController(Bag(layers), cfg)
    ema = {(i, k): (np.zeros_like(m.params[k]), np.zeros_like(m.params[k]))
           for i, m in enumerate(layers) for k in ("lora_A", "lora_E", "lora_B")}
    for _ in range(steps):
        for i, m in enumerate(layers):
            for k, p in m.params.items():
                m.grads[k] = rng.standard_normal(p.shape)
                ipt = np.abs(p * m.grads[k])
                bar_i, bar_u = ema[(i, k)]
                bar_i = beta1 * bar_i + (1 - beta1) * ipt
                bar_u = beta2 * bar_u + (1 - beta2) * np.abs(ipt - bar_i)
                ema[(i, k)] = (bar_i, bar_u)
        ctl.allocator.update_ipt()
    scores = ctl.allocator.triplet_scores()
    for i in range(len(layers)):
        s = {k: ema[(i, k)][0] * ema[(i, k)][1] for k in ("lora_A", "lora_E", "lora_B")}
        expected = naive.adalora_triplet_scores(s["lora_E"].reshape(-1), s["lora_A"], s["lora_B"])
        assert_close(scores[i], expected, f"triplet scores l{i} (beta1 {beta1}, beta2 {beta2})", RTOL64)
