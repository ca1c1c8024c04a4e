"""RoSA's entry count follows peft-rosa's rounding, int(d · (d_out · d_in)): the density times the
NUMBER of entries, not (d · d_out) · d_in, which differs by one for some densities and shapes; a
peft-rosa adapter file of such a layer loads."""
import json

import numpy as np

from spectral_peft.adapters.rosa import RosaLinear, nnz_for
from spectral_peft.adapters.peft_model import load_peft_model
from spectral_peft.module import Linear
from spectral_peft.testing import assert_close
from tests._nets import TwoLinear

D_OUT, D_IN = 6, 5  # the shape of TwoLinear's "a"


def a_density_where_the_roundings_differ() -> float:
    for k in range(1, 100000):
        d = k / 100000
        if int(d * (D_OUT * D_IN)) != int(d * D_OUT * D_IN):
            return d
    raise AssertionError(f"no density in (0, 1) separates the two roundings for ({D_OUT}, {D_IN})")


def test_nnz_is_peft_rosas_rounding_of_the_density_times_the_entry_count():
    d = a_density_where_the_roundings_differ()
    peft_rosa = int(d * (D_OUT * D_IN))  # peft-rosa: int(density * weight.numel())
    assert peft_rosa != int(d * D_OUT * D_IN)
    assert nnz_for(d, (D_OUT, D_IN)) == peft_rosa
    base = Linear(np.zeros((D_OUT, D_IN)))
    base.freeze()
    assert RosaLinear(base, r=0, d=d).nnz == peft_rosa


def test_a_peft_rosa_file_with_that_count_loads(tmp_path):
    from safetensors.numpy import save_file

    d = a_density_where_the_roundings_differ()
    nnz = int(d * (D_OUT * D_IN))
    rng = np.random.default_rng(0)
    flat = np.sort(rng.choice(D_OUT * D_IN, nnz, replace=False))
    rows, cols = np.divmod(flat, D_IN)
    row_offs = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=D_OUT))]).astype(np.int32)
    values = rng.standard_normal(nnz)
    prefix = "base_model.model.a."
    save_file({prefix + "rosa_A.weight": rng.standard_normal((2, D_IN)),
               prefix + "rosa_B.weight": rng.standard_normal((D_OUT, 2)),
               prefix + "rosa_spa.values": values, prefix + "rosa_spa.row_offs": row_offs,
               prefix + "rosa_spa.col_idx": cols.astype(np.int16),
               prefix + "rosa_spa.row_idx": np.argsort(-np.diff(row_offs), kind="stable").astype(np.int16)},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "ROSA", "r": 2, "d": d, "lora_alpha": 4, "target_modules": ["a"], "schedule": "wl0"}))
    pm = load_peft_model(TwoLinear(), tmp_path)
    layer = dict(pm.adapter_layers())["base_model.model.a"]
    assert layer.nnz == nnz
    S = np.zeros((D_OUT, D_IN))
    S[rows, cols] = values
    A, B = layer.params["rosa_A.weight"], layer.params["rosa_B.weight"]
    want = TwoLinear().a.params["weight"] + S + (4 / 2) * (B @ A)  # W + S + s·B A, s = lora_alpha / r
    x = rng.standard_normal((3, D_IN))
    assert_close(layer.forward(x), x @ want.T, "RoSA forward of the loaded file", rtol=1e-13, atol=1e-13)
