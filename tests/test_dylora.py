"""DyLoRA: gradients, truncation equals plain LoRA, frozen mode, the shared rank stream and its resume,
evaluation at any rank, the loss-by-rank table and figure."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.adapters.dylora import DyLoraConfig, DyLoraController, DyLoraLinear, loss_by_rank, set_rank
from spectral_peft.adapters.lora import A_KEY, B_KEY, LoraLinear
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.backend import get_backend, to_host
from spectral_peft.module import Linear
from spectral_peft.testing import GRADCHECK_RTOL, RTOL, assert_close, check_module_gradients
from tests._nets import TwoLinear


def make_dy(d_in, d_out, r, mode="full", seed=0, backend=None, alpha=6.0):
    rng = np.random.default_rng(seed)
    b = backend or get_backend("cpu", "float64")
    base = Linear(b.asarray(rng.standard_normal((d_out, d_in))), b.asarray(rng.standard_normal(d_out)))
    base.freeze()
    return DyLoraLinear(base, r=r, lora_alpha=alpha, mode=mode, rng=np.random.default_rng(seed + 1),
                        init_lora_weights=False)


@given(d_in=st.integers(1, 5), d_out=st.integers(1, 5), data=st.data(), seed=st.integers(0, 2**16))
def test_dylora_full_mode_gradients_match_central_differences(d_in, d_out, data, seed):
    r = data.draw(st.integers(1, min(d_in, d_out)))
    b = data.draw(st.integers(1, r))
    layer = make_dy(d_in, d_out, r, "full", seed)
    layer.set_rank(b, "train")
    x = np.random.default_rng(seed).standard_normal((3, d_in))
    check_module_gradients(layer, [x], seed=seed, rtol=GRADCHECK_RTOL)


@pytest.mark.parametrize("b", [1, 2, 4])
def test_dylora_at_rank_b_equals_lora_truncated_to_b(b):
    dy = make_dy(6, 5, 4, "full")
    dy.set_rank(b, "train")
    base = Linear(dy.base_layer.params["weight"].copy(), dy.base_layer.params["bias"].copy())
    base.freeze()
    lora = LoraLinear(base, r=b, lora_alpha=6.0, rng=np.random.default_rng(0))
    lora.params[A_KEY] = dy.params[A_KEY][:b].copy()
    lora.params[B_KEY] = dy.params[B_KEY][:, :b].copy()
    rng = np.random.default_rng(1)
    x, G = rng.standard_normal((7, 6)), rng.standard_normal((7, 5))
    assert_close(dy.forward(x), lora.forward(x), "y", 1e-13)
    assert_close(dy.backward(G), lora.backward(G), "dx", 1e-13)
    assert_close(dy.grads[A_KEY][:b], lora.grads[A_KEY], "dA[:b]", 1e-13)
    assert_close(dy.grads[B_KEY][:, :b], lora.grads[B_KEY], "dB[:, :b]", 1e-13)
    assert not dy.grads[A_KEY][b:].any() and not dy.grads[B_KEY][:, b:].any()


def test_frozen_mode_trains_only_component_b():
    full, frozen = make_dy(6, 5, 4, "full"), make_dy(6, 5, 4, "frozen")
    x, G = np.ones((3, 6)), np.arange(15.0).reshape(3, 5)
    for m in (full, frozen):
        m.set_rank(3, "train")
        m.forward(x)
        m.backward(G)
    assert not frozen.grads[A_KEY][[0, 1, 3]].any() and not frozen.grads[B_KEY][:, [0, 1, 3]].any()
    assert_close(frozen.grads[A_KEY][2], full.grads[A_KEY][2], "dA row b-1", 1e-14)
    assert_close(frozen.grads[B_KEY][:, 2], full.grads[B_KEY][:, 2], "dB col b-1", 1e-14)
    assert np.abs(frozen.grads[A_KEY][2]).sum() > 0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_dylora_matches_torch_autograd(device, dtype):
    bk = get_backend(device, dtype)
    layer = make_dy(7, 6, 4, "full", backend=bk)
    layer.set_rank(3, "train")
    rng = np.random.default_rng(2)
    x, G = rng.standard_normal((5, 7)), rng.standard_normal((5, 6))
    y = layer.forward(bk.asarray(x))
    dx = layer.backward(bk.asarray(G))
    tdt = getattr(torch, dtype)
    W, bias = (torch.tensor(to_host(layer.base_layer.params[k]), dtype=tdt) for k in ("weight", "bias"))
    A = torch.tensor(to_host(layer.params[A_KEY]), dtype=tdt, requires_grad=True)
    B = torch.tensor(to_host(layer.params[B_KEY]), dtype=tdt, requires_grad=True)
    tx = torch.tensor(x, dtype=tdt, requires_grad=True)
    ty = tx @ W.T + bias + (6.0 / 3) * (tx @ A[:3].T) @ B[:, :3].T
    ty.backward(torch.tensor(G, dtype=tdt))
    for name, mine, theirs in (("y", y, ty), ("dx", dx, tx.grad), ("dA", layer.grads[A_KEY], A.grad),
                               ("dB", layer.grads[B_KEY], B.grad)):
        assert_close(to_host(mine), theirs.detach().numpy(), name, RTOL[dtype])


def test_controller_shares_one_rank_and_resumes_its_stream():
    pm = get_peft_model(TwoLinear(), DyLoraConfig(r=4, target_modules=["a", "b"], dylora_seed=7))
    ctl = pm.controllers[0]
    assert isinstance(ctl, DyLoraController)
    drawn = []
    for step in range(1, 41):
        ctl.before_forward(step)
        assert pm.model.a.rank == pm.model.b.rank == ctl.rank
        drawn.append(ctl.rank)
        ctl.after_optimizer_step(step)  # the step is taken: its draw is committed
    assert set(drawn) == {1, 2, 3, 4}  # 40 draws from U{1..4}
    assert drawn[:10] == [int(v) for v in np.random.default_rng(7).integers(1, 5, size=40)][:10]
    state = ctl.state_dict()
    ahead = []
    for step in range(41, 51):
        ctl.before_forward(step)
        ahead.append(ctl.rank)
        ctl.after_optimizer_step(step)
    pm2 = get_peft_model(TwoLinear(), DyLoraConfig(r=4, target_modules=["a", "b"], dylora_seed=0))
    ctl2 = pm2.controllers[0]
    ctl2.load_state_dict(state)
    again = []
    for step in range(41, 51):
        ctl2.before_forward(step)
        again.append(ctl2.rank)
        ctl2.after_optimizer_step(step)
    assert again == ahead


def test_eval_at_any_rank_and_loss_table():
    pm = get_peft_model(TwoLinear(), DyLoraConfig(r=4, lora_alpha=4, target_modules=["a", "b"], init_lora_weights=False))
    x = np.random.default_rng(3).standard_normal((3, 5))
    pm.controllers[0].before_forward(1)
    pm.eval()
    full = pm.forward(x).copy()  # eval uses r_max by default
    a = pm.model.a
    W = a.base_layer.params["weight"]
    for b in range(1, 5):
        set_rank(pm, b)
        h = x @ (W + (4 / b) * a.params[B_KEY][:, :b] @ a.params[A_KEY][:b]).T
        bl = pm.model.b
        Wb = bl.base_layer.params["weight"] + (4 / b) * bl.params[B_KEY][:, :b] @ bl.params[A_KEY][:b]
        assert_close(pm.forward(x), h @ Wb.T, f"y at rank {b}", 1e-12)
    table = loss_by_rank(pm, lambda: float(np.sum(pm.forward(x) ** 2)))
    assert sorted(table) == [1, 2, 3, 4]
    assert table[4] == pytest.approx(float(np.sum(full ** 2)), rel=1e-12)
    assert a.eval_rank == 4
    with pytest.raises(ValueError, match=r"rank must be in \[1, r_max=4\], got 5"):
        set_rank(pm, 5)


def test_dylora_figure_is_written(tmp_path):
    from spectral_peft.plots.dylora import plot_loss_by_rank

    out = tmp_path / "dylora.png"
    plot_loss_by_rank({1: 3.0, 2: 2.5, 4: 2.1}, out, lora_losses={4: 2.0})
    assert out.stat().st_size > 1000


def test_rank_records_and_table():
    from spectral_peft.plots.dylora import loss_table, plot_rank_eval, rank_losses

    assert rank_losses({"1": 3.0, "2": 2.5}) == ({1: 3.0, 2: 2.5}, None)
    assert rank_losses({"ranks": [1, 2], "losses": [3.0, 2.5], "lora_ranks": [2], "lora_losses": [2.4]}) == \
        ({1: 3.0, 2: 2.5}, {2: 2.4})
    assert loss_table({1: 3.0, 2: 2.5}, {2: 2.4}).splitlines()[2:] == ["| 1 | 3.0000 | - |", "| 2 | 2.5000 | 2.4000 |"]
    with pytest.raises(ValueError, match="at least one"):
        plot_rank_eval({}, "unused.png")


def test_rank_pattern_layers_stop_at_their_own_rank():
    pm = get_peft_model(TwoLinear(), DyLoraConfig(r=4, target_modules=["a", "b"], rank_pattern={"b": 2}))
    ctl = pm.controllers[0]
    assert ctl.r_max == 4
    for step in range(1, 30):
        ctl.before_forward(step)
        assert pm.model.a.rank == ctl.rank and pm.model.b.rank == min(ctl.rank, 2)
        ctl.after_optimizer_step(step)
    set_rank(pm, 3)
    assert pm.model.a.eval_rank == 3 and pm.model.b.eval_rank == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(dylora_mode="half"), r"dylora_mode must be one of \('frozen', 'full'\), got 'half'"),
    (dict(use_dora=True), r"use_dora=True is not supported"),
])
def test_bad_dylora_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DyLoraConfig(target_modules=["a"], **kwargs)


def test_a_dylora_run_improves_the_loss_at_every_rank(tmp_path):
    """Train a tiny GPT-2 with DyLoRA (one shared random rank per step), then evaluate at every rank
    without retraining: each rank's loss is below the base model's, and the figure is written."""
    from spectral_peft.model import GPT2Config, GPT2LMHeadModel
    from spectral_peft.optim import AdamW
    from spectral_peft.plots.dylora import plot_loss_by_rank

    cfg = GPT2Config(vocab_size=17, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg, get_backend("cpu", "float64"), seed=0)
    ids = np.random.default_rng(0).integers(0, 17, (4, 8))
    base_loss = float(model.forward(ids, labels=ids).loss)
    model.clear_cache()
    pm = get_peft_model(model, DyLoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], dylora_seed=1))
    opt = AdamW(pm, lr=2e-2, weight_decay=0.0)
    ctl = pm.controllers[0]
    pm.train()
    for step in range(1, 61):
        ctl.before_forward(step)
        pm.forward(ids, labels=ids)
        pm.backward()
        opt.step()
        ctl.after_optimizer_step(step)
        opt.zero_grad()

    def evaluate():
        loss = float(pm.forward(ids, labels=ids).loss)
        pm.clear_cache()
        return loss

    table = loss_by_rank(pm, evaluate)
    assert sorted(table) == [1, 2, 3, 4]
    assert all(loss < base_loss - 0.05 for loss in table.values()), (base_loss, table)
    plot_loss_by_rank(table, tmp_path / "rank.png")
    assert (tmp_path / "rank.png").stat().st_size > 1000
