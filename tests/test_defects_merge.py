"""Merging and the dense weight a layer applies: DyLoRA merges at its evaluation rank whatever the
mode and unmerges exactly what it merged; DoRA's effective_weight is the matrix its forward applies."""
import numpy as np
import pytest

from spectral_peft.adapters.dora import M_KEY, DoraLinear
from spectral_peft.adapters.dylora import DyLoraLinear
from spectral_peft.adapters.lora import A_KEY, B_KEY
from spectral_peft.module import Linear
from spectral_peft.testing import assert_close


def dense_base(d_in, d_out, seed):
    rng = np.random.default_rng(seed)
    base = Linear(rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out))
    base.freeze()
    return base


def make_dylora(seed=0, r=4, alpha=6.0):
    return DyLoraLinear(dense_base(7, 5, seed), r=r, lora_alpha=alpha, mode="full",
                        rng=np.random.default_rng(seed + 1), init_lora_weights=False)


def test_dylora_merges_at_the_evaluation_rank_in_train_mode():
    layer = make_dylora()
    layer.set_rank(2, "train")  # the rank drawn at the last training step
    layer.train()
    W0 = layer.base_layer.params["weight"].copy()
    A, B = layer.params[A_KEY], layer.params[B_KEY]
    want = W0 + (6.0 / 4) * (B @ A)  # r_max = 4 with α/r_max: the LoRA its adapter file describes
    layer.merge()
    assert_close(layer.base_layer.params["weight"], want, name="merged W (train mode)", rtol=1e-13, atol=1e-13)


def test_dylora_merge_in_eval_then_unmerge_in_train_restores_the_weight():
    layer = make_dylora(seed=3)
    layer.set_rank(1, "train")
    W0 = layer.base_layer.params["weight"].copy()
    layer.eval()
    layer.merge()
    layer.train()
    layer.unmerge()
    assert_close(layer.base_layer.params["weight"], W0, name="W after merge (eval) / unmerge (train)",
                 rtol=0, atol=1e-14)


def test_dylora_merge_at_a_chosen_eval_rank_equals_its_forward():
    layer = make_dylora(seed=5)
    layer.set_rank(3, "eval")
    layer.set_rank(1, "train")
    layer.eval()
    x = np.random.default_rng(9).standard_normal((4, 7))
    y_eval = layer.forward(x)
    layer.train()  # merging in train mode still merges the evaluation rank
    layer.merge()
    assert_close(layer.forward(x), y_eval, name="merged forward vs eval forward at b=3", rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("bias", [True, False])
def test_dora_effective_weight_is_what_the_forward_applies(bias):
    rng = np.random.default_rng(2)
    base = Linear(rng.standard_normal((6, 8)), rng.standard_normal(6) if bias else None)
    base.freeze()
    layer = DoraLinear(base, r=3, lora_alpha=5.0, rng=np.random.default_rng(4), init_lora_weights=False)
    layer.params[M_KEY] = layer.params[M_KEY] * rng.uniform(0.5, 1.5, size=6)  # g = m/n != 1
    layer.eval()
    x = rng.standard_normal((5, 8))
    y = layer.forward(x)
    W = layer.base_layer.params["weight"]
    V = W + layer.scaling * (layer.params[B_KEY] @ layer.params[A_KEY])
    want = (layer.params[M_KEY] / np.linalg.norm(V, axis=1))[:, None] * V  # g ⊙ (W + s·BA), per output row
    E = layer.effective_weight()
    assert_close(E, want, name="DoRA effective_weight vs g ⊙ (W + s·BA)", rtol=1e-13, atol=1e-13)
    lin = x @ E.T + (base.params["bias"] if bias else 0.0)
    assert_close(lin, y, name="x @ effective_weight.T + bias vs DoRA forward", rtol=1e-13, atol=1e-13)
    layer.merge()
    assert_close(layer.effective_weight(), want, name="DoRA effective_weight when merged", rtol=1e-13, atol=1e-13)
