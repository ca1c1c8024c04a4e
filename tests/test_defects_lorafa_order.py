"""LoRA-FA's corrected gradient in PEFT's order, with clipping active: the Trainer clips the raw
gradients, then B's gradient is corrected, then the Adam update, then the weight decay on the
updated B: PEFT's LoraFAOptimizer behind torch's clip_grad_norm_ (float64; PEFT's bf16 autocast
is turned off so that the peer computes in float64 too)."""
import numpy as np
import pytest

from spectral_peft.adapters.lorafa import LoraFAConfig, lorafa_optimizer
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.backend import get_backend
from spectral_peft.adapters.peft_model import save_adapter
from spectral_peft.model import GPT2Config, GPT2LMHeadModel, save_pretrained
from spectral_peft.testing import assert_close
from spectral_peft.train import Trainer

V, LR, WD, CLIP, R, ALPHA = 23, 2e-2, 0.1, 0.01, 3, 6


def test_corrected_gradient_and_weight_decay_in_peft_order_with_clipping(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch", reason="the peer: torch")
    transformers = pytest.importorskip("transformers", reason="the peer: transformers")
    peft = pytest.importorskip("peft", reason="the peer: PEFT (LoraFAOptimizer)")
    import peft.optimizers.lorafa as peft_lorafa

    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)  # float64 all through
    cfg = GPT2Config(vocab_size=V, n_positions=8, n_embd=12, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg, get_backend("cpu", "float64"), seed=0)
    save_pretrained(model, tmp_path / "base")
    pm = get_peft_model(model, LoraFAConfig(r=R, lora_alpha=ALPHA, target_modules=["c_attn", "c_fc"],
                                            corrected_grad=True, init_lora_weights=False), seed=1)
    save_adapter(pm, tmp_path / "adapter")
    trainer = Trainer(pm, lorafa_optimizer(pm, lr=LR, weight_decay=WD), max_grad_norm=CLIP)

    tm = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "base"), attn_implementation="eager",
                                                      dtype=torch.float64)
    pm_t = peft.PeftModel.from_pretrained(tm, str(tmp_path / "adapter"), is_trainable=True)
    opt_t = peft_lorafa.create_lorafa_optimizer(pm_t, r=R, lora_alpha=ALPHA, lr=LR, weight_decay=WD)
    rng = np.random.default_rng(2)
    for step in range(4):
        ids = rng.integers(0, V, (2, 8))
        m = trainer.train_step({"input_ids": ids, "labels": ids})
        logits = pm_t(input_ids=torch.tensor(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.tensor(ids)[:, 1:].reshape(-1))
        loss.backward()
        trainable = [p for p in pm_t.parameters() if p.requires_grad]
        norm = float(torch.nn.utils.clip_grad_norm_(trainable, CLIP))
        assert norm > 2 * CLIP, f"step {step}: clipping is not active (norm {norm})"
        opt_t.step()
        opt_t.zero_grad()
        assert_close(np.array(m["loss"]), np.array(loss.item()), f"loss at step {step}", 1e-11)
    grads = dict(pm_t.named_parameters())
    for path, layer in pm.adapter_layers():
        name = path + ".lora_B.default.weight"
        assert_close(layer.params["lora_B.weight"], grads[name].detach().numpy(), f"{name} after 4 steps", 1e-10)
