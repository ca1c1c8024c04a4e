"""The central-difference gradient check the op tests share (tests/test_ops.py, test_ops_wide.py)."""
import numpy as np

from spectral_peft.testing import GRADCHECK_RTOL, assert_close, numerical_gradient


def check_grads(forward, backward, inputs: dict, seed: int, scalar_out: bool = False, eps: float = 1e-6):
    """Central differences of L = Σ forward(*inputs)[0] ⊙ G against backward(G, cache).

    forward(*arrays) -> (out, cache); backward(G, cache) -> one gradient per input, in order.
    ``eps`` is the step of the differences; inputs scaled by s call for eps ~ 1e-6·s where the op's
    curvature scales with its input (norms, elementwise activations).
    """
    rng = np.random.default_rng(seed)
    arrays = list(inputs.values())
    originals = [a.copy() for a in arrays]
    out, cache = forward(*arrays)
    G = float(rng.standard_normal()) if scalar_out else rng.standard_normal(np.shape(out))
    G0 = np.copy(G)
    grads = backward(G, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    assert len(grads) == len(arrays)
    for name, a, a0 in zip(inputs, arrays, originals):
        assert np.array_equal(a, a0), f"{name} was mutated by forward/backward"
    assert np.array_equal(G, G0), "the upstream gradient was mutated by backward"

    def loss() -> float:
        return float(np.sum(forward(*arrays)[0] * G))

    # central differences carry round-off of about machine-eps·Σ|out ⊙ G| / eps (1e-10·Σ|out ⊙ G| at
    # eps = 1e-6): a floor for the absolute tolerance where the true gradient is ~0 (LayerNorm, C = 1)
    noise = 1e-15 / eps * max(1.0, float(np.sum(np.abs(np.asarray(out) * G))))
    for (name, a), g in zip(inputs.items(), grads):
        num = numerical_gradient(loss, a, eps)
        atol = GRADCHECK_RTOL * float(np.max(np.abs(num), initial=0.0)) + noise
        assert_close(g, num, f"d{name}", rtol=GRADCHECK_RTOL, atol=atol)
