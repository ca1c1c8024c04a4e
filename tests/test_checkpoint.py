"""Checkpoint I/O: round trips, atomic writes, retention, and refusal of damaged or foreign files
with nothing half-loaded. Also the safetensors reader against the reference library."""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors.torch import save as torch_save

from spectral_peft.io import checkpoint as C
from spectral_peft.io.safe import (FileFormatError, load_json, load_safetensors, safetensors_bytes,
                                   save_json, save_safetensors)

sys.path.insert(0, os.path.dirname(__file__))
import _train_worker as W  # noqa: E402


def params_of(model):
    return {n: m.params[k].copy() for n, m, k in model.named_parameters()}


def file_hashes(d):
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest() for n in sorted(os.listdir(d))}


# --- state encoding ------------------------------------------------------------------------------
def test_encode_decode_keeps_types_dtypes_and_order():
    g = np.random.default_rng(7)
    g.random(3)
    state = {"b": np.float32(0.1), "a": (1, 2.5, None, "x"), "arr": np.arange(6, dtype=np.int16).reshape(2, 3),
             "nested": [{"z": np.array([1.5], dtype=np.float64)}], (3, "k"): True, "__odd": 1, "gen": g,
             "flag": np.bool_(True), "big": 2**70}
    arrays: dict = {}
    enc = C.encode_state(state, "p", arrays)
    blob = json.loads(json.dumps(enc))  # through JSON text, as on disk
    back = C.decode_state(blob, arrays, "<test>")
    assert list(back) == list(state)
    assert type(back["b"]) is np.float32 and back["b"] == np.float32(0.1)
    assert back["a"] == (1, 2.5, None, "x")
    assert back["arr"].dtype == np.int16 and np.array_equal(back["arr"], state["arr"])
    assert np.array_equal(back["nested"][0]["z"], [1.5])
    assert back[(3, "k")] is True and back["__odd"] == 1 and back["big"] == 2**70
    assert type(back["flag"]) is np.bool_
    assert back["gen"].random() == g.random()  # same stream position, a separate object
    arrays["p#0"] = None  # the encoder copied: changing the original does not reach the blob
    state["arr"][0, 0] = 99
    assert back["arr"][0, 0] == 0


def test_encode_refuses_objects_it_cannot_store():
    with pytest.raises(TypeError, match=r"optimizer\['fn'\].*object cannot be checkpointed"):
        C.encode_state({"fn": object()}, "p", {}, "optimizer")


def test_decode_names_a_dangling_array_reference():
    with pytest.raises(FileFormatError, match=r"state.safetensors.*'p#3'"):
        C.decode_state({"x": {"__ndarray__": "p#3"}}, {}, "state.safetensors")


# --- save / load round trip ----------------------------------------------------------------------
def test_load_restores_parameters_generators_and_optimizer_bitwise(tmp_path):
    t1, b1 = W.build("full", "float64")
    t1.fit(b1, 3)
    path = C.save_checkpoint(tmp_path, 3, t1.model, t1.optimizer, t1.schedule, t1.controllers, data=b1,
                             trainer_state={"step": 3})
    assert os.path.basename(path) == "step-00000003"
    assert sorted(os.listdir(path)) == ["model.safetensors", "state.json", "state.safetensors"]
    t2, _ = W.build("full", "float64", seed=1)  # other weights, other generator states
    b2 = W.SeededBatches(W.tokens(), batch_size=W.B, seq_len=W.T, seed=0)  # the same data
    before = params_of(t2.model)
    ck = C.load_checkpoint(path, t2.model, t2.optimizer, t2.schedule, t2.controllers, data=b2)
    assert ck.step == 3 and ck.states["trainer"] == {"step": 3} and b2.position == 3
    after = params_of(t2.model)
    for name, p in params_of(t1.model).items():
        assert np.array_equal(after[name], p), name
        assert not np.array_equal(before[name], p), name  # the load really changed something
    g1, g2 = C.collect_generators(t1.model), C.collect_generators(t2.model)
    assert sorted(g1) == sorted(g2) and g1
    for k in g1:
        assert g1[k].bit_generator.state == g2[k].bit_generator.state
    assert json.dumps(C.encode_state(t1.optimizer.state_dict(), "o", {})) == \
        json.dumps(C.encode_state(t2.optimizer.state_dict(), "o", {}))


def test_files_are_standard_safetensors(tmp_path):
    t, b = W.build("full", "float32")
    path = C.save_checkpoint(tmp_path, 0, t.model, t.optimizer)
    ref = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    for n, m, k in t.model.named_parameters():
        assert ref[n].dtype == np.float32 and np.array_equal(ref[n], m.params[k])


def test_retention_keeps_the_newest(tmp_path):
    t, _ = W.build("full", "float64")
    for step in range(1, 6):
        C.save_checkpoint(tmp_path, step, t.model, t.optimizer, keep_last=2)
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [4, 5]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    t, _ = W.build("full", "float64")
    good = C.save_checkpoint(tmp_path, 2, t.model, t.optimizer)
    hashes = file_hashes(good)

    def crash(name):
        if name == "state.safetensors":
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(C, "_after_file_hook", crash)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(tmp_path, 4, t.model, t.optimizer, keep_last=1)
    assert C.latest_checkpoint(tmp_path) == good and file_hashes(good) == hashes
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-step-00000004")]
    assert C.clean_partial(tmp_path) and sorted(os.listdir(tmp_path)) == ["step-00000002"]


def test_resaving_a_step_replaces_it(tmp_path):
    t, _ = W.build("full", "float64")
    C.save_checkpoint(tmp_path, 2, t.model, t.optimizer)
    first = t.model.named_parameters().__next__()
    first[1].params[first[2]][...] += 1.0
    path = C.save_checkpoint(tmp_path, 2, t.model, t.optimizer)
    ck = C.read_checkpoint(path)
    assert np.array_equal(ck.params[first[0]], first[1].params[first[2]])


# --- damaged and foreign checkpoints: refused, nothing half-loaded -------------------------------
@pytest.fixture
def saved(tmp_path):
    t, b = W.build("full", "float64")
    t.fit(b, 2)
    return C.save_checkpoint(tmp_path, 2, t.model, t.optimizer, data=b), t


def _fresh():
    t, b = W.build("full", "float64", seed=3)
    return t, b, params_of(t.model)


def _unchanged(t, before):
    for n, p in params_of(t.model).items():
        assert np.array_equal(p, before[n]), f"{n} was modified by a refused load"


@pytest.mark.parametrize("damage,match", [
    (lambda d: _flip(os.path.join(d, "model.safetensors"), 500), r"model.safetensors: SHA-256 differs"),
    (lambda d: _truncate(os.path.join(d, "state.safetensors"), 100), r"state.safetensors: SHA-256 differs"),
    (lambda d: os.remove(os.path.join(d, "state.safetensors")), r"state.safetensors: file not found"),
    (lambda d: _truncate(os.path.join(d, "state.json"), 40), r"state.json: is not valid JSON"),
    (lambda d: _edit_manifest(d, lambda m: m.pop("step")), r"state.json: key 'step': missing"),
    (lambda d: _edit_manifest(d, lambda m: m.update(format=99)), r"key 'format': checkpoint format 99"),
    (lambda d: _edit_manifest(d, lambda m: m["states"].update(controllers=[{}])),
     r"holds 1 controller states; the run has 0"),
    (lambda d: _edit_manifest(d, lambda m: m["states"]["generators"].clear()), r"saved generators \[\]"),
])
def test_damaged_checkpoint_is_refused_naming_the_file(saved, damage, match):
    path, _ = saved
    damage(path)
    t, b, before = _fresh()
    with pytest.raises(FileFormatError, match=match):
        C.load_checkpoint(path, t.model, t.optimizer, data=b)
    _unchanged(t, before)


def _flip(p, offset):
    with open(p, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(p, n):
    with open(p, "r+b") as f:
        f.truncate(n)


def _edit_manifest(d, fn):
    p = os.path.join(d, "state.json")
    m = json.load(open(p))
    fn(m)
    json.dump(m, open(p, "w"))


def test_checkpoint_of_another_method_is_refused_naming_the_key(saved):
    path, _ = saved
    t, b = W.build("adalora", "float64")  # the same base model with adapters injected
    before = params_of(t.model)
    with pytest.raises(FileFormatError, match=r"model.safetensors: key '.*': (missing|is not a parameter)"):
        C.load_checkpoint(path, t.model, t.optimizer, t.schedule, t.controllers, data=b)
    _unchanged(t, before)


def test_checkpoint_of_another_dtype_is_refused(saved):
    path, _ = saved
    t, b = W.build("full", "float32")
    with pytest.raises(FileFormatError, match=r"dtype float64; the model's parameter is .* float32"):
        C.load_checkpoint(path, t.model, t.optimizer, data=b)


def test_a_component_refusing_its_state_rolls_everything_back(saved):
    path, _ = saved
    t, b, before = _fresh()
    opt_before = json.dumps(C.encode_state(t.optimizer.state_dict(), "o", {}))
    gens_before = {k: g.bit_generator.state for k, g in C.collect_generators(t.model).items()}
    b_other = W.SeededBatches(W.tokens(), batch_size=W.B, seq_len=W.T, seed=99)  # refuses seed 0's state
    with pytest.raises(FileFormatError, match=r"key 'states.data': refused by data.load_state_dict .*data state seed = 0 but this data source has 99"):
        C.load_checkpoint(path, t.model, t.optimizer, data=b_other)
    _unchanged(t, before)
    assert json.dumps(C.encode_state(t.optimizer.state_dict(), "o", {})) == opt_before
    assert {k: g.bit_generator.state for k, g in C.collect_generators(t.model).items()} == gens_before


# --- the safetensors reader ----------------------------------------------------------------------
def test_reader_matches_the_reference_library_both_ways(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"f64": rng.normal(size=(3, 4)), "f32": rng.normal(size=(5,)).astype(np.float32),
              "f16": rng.normal(size=(2, 2)).astype(np.float16), "i64": np.arange(4), "u8": np.arange(7, dtype=np.uint8),
              "b": np.array([True, False]), "empty": np.zeros((0, 3), np.float32), "i8": np.array([-3], np.int8)}
    theirs = safetensors.numpy.save(arrays)
    p = tmp_path / "x.safetensors"
    p.write_bytes(theirs)
    mine = load_safetensors(p)
    assert sorted(mine) == sorted(arrays)
    for k, a in arrays.items():
        assert mine[k].dtype == a.dtype and mine[k].shape == a.shape and np.array_equal(mine[k], a), k
    back = safetensors.numpy.load(safetensors_bytes(arrays))
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and np.array_equal(back[k], a), k


def test_reader_reads_bf16_exactly(tmp_path):
    t = torch.tensor([1.0, -2.5, 3.140625, 1e-3], dtype=torch.bfloat16)
    p = tmp_path / "bf.safetensors"
    p.write_bytes(torch_save({"w": t}))
    got = load_safetensors(p)["w"]
    assert got.dtype == np.float32 and np.array_equal(got, t.float().numpy())


def test_expected_keys_shapes_dtypes(tmp_path):
    p = tmp_path / "a.safetensors"
    save_safetensors({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}, p)
    assert set(load_safetensors(p, {"w": ((2, 3), "float32")})) == {"w", "b"}
    with pytest.raises(FileFormatError, match=r"a.safetensors: key 'v': missing"):
        load_safetensors(p, {"v": (None, None)})
    with pytest.raises(FileFormatError, match=r"key 'w': shape \(2, 3\), expected \(3, 2\)"):
        load_safetensors(p, {"w": ((3, 2), None)})
    with pytest.raises(FileFormatError, match=r"key 'w': dtype float32, expected float64"):
        load_safetensors(p, {"w": (None, "float64")})
    with pytest.raises(FileFormatError, match=r"key 'b': unexpected tensor"):
        load_safetensors(p, {"w": (None, None)}, allow_extra=False)
    save_safetensors({"w": np.array([1.0, np.nan])}, p)
    with pytest.raises(FileFormatError, match=r"key 'w': holds 1 non-finite"):
        load_safetensors(p, allow_nonfinite=False)


def test_json_helpers(tmp_path):
    p = tmp_path / "c.json"
    save_json({"r": 8, "alpha": 16.0, "flag": True}, p)
    assert load_json(p, {"r": int, "alpha": (int, float)}) == {"r": 8, "alpha": 16.0, "flag": True}
    with pytest.raises(FileFormatError, match=r"c.json: key 'flag': expected int, got bool"):
        load_json(p, {"flag": int})
    with pytest.raises(FileFormatError, match=r"c.json: key 'missing': missing"):
        load_json(p, {"missing": int})
    with pytest.raises(FileFormatError, match=r"nope.json: file not found"):
        load_json(tmp_path / "nope.json")


def test_trainer_resume_refuses_an_inconsistent_trainer_state_before_loading(tmp_path):
    t, b = W.build("full", "float64", checkpoint_dir=str(tmp_path))
    t.fit(b, 2)
    _edit_manifest(t.last_checkpoint, lambda m: m["states"]["trainer"].update(step=7))
    t2, _, before = _fresh()
    t2.checkpoint_dir = str(tmp_path)
    with pytest.raises(FileFormatError, match=r"state.json: key 'states.trainer': .* checkpoint step 2"):
        t2.resume()
    _unchanged(t2, before)
    assert t2.step == 0
