"""LoRA with r > min(d_in, d_out), which PEFT allows: the layer builds, its gradients pass central
differences, and a PEFT file of such a rank loads and matches PEFT in float64."""
import numpy as np
import pytest

from spectral_peft.adapters.lora import LoraLinear
from spectral_peft.backend import get_backend
from spectral_peft.adapters.peft_model import load_peft_model
from spectral_peft.model import GPT2Config, GPT2LMHeadModel, load_pretrained, save_pretrained
from spectral_peft.module import Linear
from spectral_peft.testing import GRADCHECK_RTOL, assert_close, check_module_gradients


def test_lora_rank_above_both_widths_passes_central_differences():
    rng = np.random.default_rng(0)
    base = Linear(rng.standard_normal((3, 4)), rng.standard_normal(3))
    base.freeze()
    layer = LoraLinear(base, r=6, lora_alpha=5.0, rng=np.random.default_rng(1), init_lora_weights=False)
    assert layer.params["lora_A.weight"].shape == (6, 4) and layer.params["lora_B.weight"].shape == (3, 6)
    check_module_gradients(layer, [rng.standard_normal((5, 4))], seed=2, rtol=GRADCHECK_RTOL)


def test_a_peft_file_with_rank_above_the_width_loads_and_matches_peft(tmp_path):
    torch = pytest.importorskip("torch", reason="the peer: torch")
    transformers = pytest.importorskip("transformers", reason="the peer: transformers")
    peft = pytest.importorskip("peft", reason="the peer: PEFT")
    C, r = 8, 12  # r > n_embd = min(d_in, d_out) of every adapted linear
    ckpt, adapter = tmp_path / "gpt2", tmp_path / "adapter"
    save_pretrained(GPT2LMHeadModel(GPT2Config(vocab_size=17, n_positions=8, n_embd=C, n_layer=1, n_head=2,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                                    get_backend("cpu", "float64"), seed=3), ckpt)
    tm = transformers.GPT2LMHeadModel.from_pretrained(str(ckpt), attn_implementation="eager", dtype=torch.float64)
    torch.manual_seed(0)
    pm_t = peft.get_peft_model(tm, peft.LoraConfig(r=r, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                                   init_lora_weights=False)).eval()
    pm_t.save_pretrained(str(adapter))
    pm = load_peft_model(load_pretrained(ckpt, get_backend("cpu", "float64")), adapter)
    pm.eval()
    ids = np.random.default_rng(4).integers(0, 17, (2, 6))
    out = pm.forward(input_ids=ids, labels=ids)
    pm.zero_grad()
    pm.backward()
    t_logits = pm_t(input_ids=torch.tensor(ids)).logits
    t_loss = torch.nn.functional.cross_entropy(t_logits[:, :-1].reshape(-1, 17), torch.tensor(ids)[:, 1:].reshape(-1))
    t_loss.backward()
    assert_close(out.logits, t_logits.detach().numpy(), "logits", 1e-10)
    grads = pm.named_grads()
    for n, p in pm_t.named_parameters():
        if p.requires_grad:
            key = n.replace(".default.weight", ".weight")
            assert_close(grads[key], p.grad.numpy(), key, 1e-10)
