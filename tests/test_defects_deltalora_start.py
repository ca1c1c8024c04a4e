"""Delta-LoRA's start step in the paper's convention (Zi et al. 2023, Algorithm 1: for t = 0..T−1,
W moves when t > K): the controller receives the 0-based index t of the step just taken, as the
Trainer passes it, so W stays fixed over the first K + 1 steps and moves from the (K + 2)-th on."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _train_worker as W  # noqa: E402


def test_trainer_moves_W_from_step_index_K_plus_one():
    trainer, batches = W.build("deltalora")  # delta_start_step K = 3
    K = trainer.controllers[0].start
    assert K == 3
    layer = trainer.model.get_submodule(next(p for p, _ in trainer.model.adapter_layers()))
    W0 = layer.base_layer.params["weight"].copy()
    for t in range(K + 1):  # t = 0..K: not t > K
        trainer.fit(batches, t + 1)
        assert np.array_equal(layer.base_layer.params["weight"], W0), f"W moved at step index {t} <= K"
    trainer.fit(batches, K + 2)  # t = K + 1 > K
    assert not np.array_equal(layer.base_layer.params["weight"], W0), "W did not move at step index K + 1"
