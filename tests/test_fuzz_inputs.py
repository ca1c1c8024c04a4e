"""Hypothesis fuzzing of everything a user hands the engine: file contents (random bytes,
truncations, flipped bytes, mutated headers, wrong dtypes and shapes), checkpoint manifests, PEFT
adapter directories, configs, and batches. Every case must either work or raise a clean, specific
exception (FileFormatError / ValueError / TypeError whose message names the file or field), never a
traceback from inside NumPy, json or struct, and a refused load must leave the model untouched."""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import struct
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spectral_peft import cli
from spectral_peft.io import checkpoint as C
from spectral_peft.adapters.peft_model import load_peft_model, save_adapter
from spectral_peft.io.safe import (FileFormatError, load_json, load_safetensors, parse_json, parse_safetensors,
                                   safetensors_bytes)
from spectral_peft.model.hf import save_pretrained
from spectral_peft.train import SeededBatches, Trainer

sys.path.insert(0, os.path.dirname(__file__))
import _train_worker as W  # noqa: E402

fuzz = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)

VALID = safetensors_bytes({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "ids": np.arange(5),
                           "m": np.array([True, False, True])})


def parse_or_refuse(raw):
    """Parse; the only acceptable failure is FileFormatError, which names the file."""
    try:
        return parse_safetensors(raw, "fuzz.safetensors")[0]
    except FileFormatError as exc:
        assert str(exc).startswith("fuzz.safetensors: ")
        return None


# --- safetensors contents ------------------------------------------------------------------------
@given(st.binary(max_size=300))
def test_random_bytes(raw):
    parsed = parse_or_refuse(raw)
    assert parsed is None or isinstance(parsed, dict)  # refused cleanly, or a well-formed (empty) file


@given(st.binary(min_size=8, max_size=200))
def test_random_bytes_behind_a_plausible_header_length(raw):
    parsed = parse_or_refuse(struct.pack("<Q", len(raw) // 2) + raw)
    assert parsed is None or isinstance(parsed, dict)


def test_every_truncation_is_refused():
    for n in range(len(VALID)):
        with pytest.raises(FileFormatError, match="truncated|not valid UTF-8 JSON|trailing|header length"):
            parse_safetensors(VALID[:n], "fuzz.safetensors")


@given(st.integers(0, len(VALID) - 1), st.integers(1, 255))
def test_flipped_bytes_parse_or_are_refused(pos, x):
    raw = bytearray(VALID)
    raw[pos] ^= x
    out = parse_or_refuse(bytes(raw))
    if out is not None:  # a flip in the data, or a key or dtype name changed into another valid one
        assert len(out) == 3 and sum(a.nbytes for a in out.values()) == 12 * 4 + 5 * 8 + 3


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                         st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c,
                                                                                              max_size=4), max_leaves=12)


@given(dtype=st.one_of(st.sampled_from(["F32", "F64", "I64", "U8", "BOOL", "BF16", "F8_E4M3", "f32", ""]), json_values),
       shape=st.one_of(st.lists(st.integers(-3, 5), max_size=3), json_values),
       offsets=st.one_of(st.lists(st.integers(-5, 80), min_size=0, max_size=3), json_values),
       extra=st.booleans(), data_len=st.integers(0, 80))
def test_mutated_headers(dtype, shape, offsets, extra, data_len):
    entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    if extra:
        entry["x"] = 1
    head = json.dumps({"t": entry}).encode()
    out = parse_or_refuse(struct.pack("<Q", len(head)) + head + bytes(data_len))
    if out is not None:  # accepted only when every field was consistent
        item = {"F32": 4, "F64": 8, "I64": 8, "U8": 1, "BOOL": 1, "BF16": 2}[dtype]
        assert list(out["t"].shape) == shape and offsets == [0, math.prod(shape) * item] and data_len == offsets[1]


@given(shape=st.lists(st.integers(0, 3), max_size=3),
       dtype=st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "float16"]),
       want_shape=st.lists(st.integers(0, 3), max_size=3),
       want_dtype=st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "float16"]))
@fuzz
def test_wrong_dtype_or_shape_is_named(tmp_path, shape, dtype, want_shape, want_dtype):
    p = tmp_path / "f.safetensors"
    p.write_bytes(safetensors_bytes({"k": np.zeros(shape, dtype=dtype)}))
    if (shape, dtype) == (want_shape, want_dtype):
        assert load_safetensors(p, {"k": (want_shape, want_dtype)})["k"].dtype == np.dtype(dtype)
    else:
        with pytest.raises(FileFormatError, match=r"f.safetensors: key 'k': (shape|dtype)"):
            load_safetensors(p, {"k": (want_shape, want_dtype)})


# --- JSON ----------------------------------------------------------------------------------------
@given(st.binary(max_size=200))
def test_random_json_bytes(raw):
    try:
        parse_json(raw, "c.json")
    except FileFormatError as exc:
        assert str(exc).startswith("c.json: ")


@given(json_values)
@fuzz
def test_json_schema_refusals(tmp_path, value):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"r": value}))
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok:
        assert load_json(p, {"r": int}) == {"r": value}
    else:
        with pytest.raises(FileFormatError, match=r"c.json: key 'r': expected int"):
            load_json(p, {"r": int})


# --- checkpoints ---------------------------------------------------------------------------------
METHOD = "lora"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    t, b = W.build(METHOD, "float32", checkpoint_dir=str(d))
    t.fit(b, 1)
    return t.last_checkpoint


def _manifest_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _manifest_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _manifest_paths(v, prefix + (i,))


@given(data=st.data())
@fuzz
def test_mutated_manifest_is_refused_cleanly_and_nothing_is_half_loaded(ckpt, tmp_path_factory, data):
    manifest = json.load(open(os.path.join(ckpt, "state.json")))
    paths = [p for p in _manifest_paths(manifest) if p]
    where = data.draw(st.sampled_from(paths))
    value = data.draw(json_values)
    target = manifest
    for k in where[:-1]:
        target = target[k]
    assume(target[where[-1]] != value)
    target[where[-1]] = value
    d = tmp_path_factory.mktemp("mut")
    for name in ("model.safetensors", "state.safetensors"):
        (d / name).write_bytes(open(os.path.join(ckpt, name), "rb").read())
    (d / "state.json").write_text(json.dumps(manifest))
    t, b = W.build(METHOD, "float32")  # fresh: differs from the checkpoint, which took a step
    before = {n: m.params[k].copy() for n, m, k in t.model.named_parameters()}
    try:
        C.load_checkpoint(d, t.model, t.optimizer, t.schedule, t.controllers, data=b)
    except FileFormatError as exc:
        assert str(d) in str(exc)
        for n, m, k in t.model.named_parameters():
            assert np.array_equal(m.params[k], before[n]), f"{n} half-loaded"
    # else: a harmless edit (a value nobody reads, e.g. the trainer's own history) loads fine


@given(st.binary(max_size=64))
@fuzz
def test_random_bytes_as_checkpoint_files(ckpt, tmp_path_factory, raw):
    for victim in ("model.safetensors", "state.safetensors", "state.json"):
        d = tmp_path_factory.mktemp("rb")
        for name in ("model.safetensors", "state.safetensors", "state.json"):
            (d / name).write_bytes(raw if name == victim else open(os.path.join(ckpt, name), "rb").read())
        with pytest.raises(FileFormatError, match=victim.replace(".", r"\.")):
            C.read_checkpoint(d)


# --- PEFT adapter directories (adapters/peft_model.py, through io.safe) ----------------------------------------
@given(cut=st.integers(0, 400), which=st.sampled_from(["adapter_model.safetensors", "adapter_config.json"]))
@fuzz
def test_truncated_adapter_files_are_refused(tmp_path_factory, cut, which):
    t, _ = W.build("lora", "float32")
    d = tmp_path_factory.mktemp("ad")
    save_adapter(t.model, d)
    raw = (d / which).read_bytes()
    assume(cut < len(raw))
    (d / which).write_bytes(raw[:cut])
    fresh, _ = W.make_model(W.get_backend("cpu", "float32"), 0)
    names = sorted(n for n, _, _ in fresh.named_parameters())
    with pytest.raises(FileFormatError, match=which.replace(".", r"\.")):
        load_peft_model(fresh, d)
    assert sorted(n for n, _, _ in fresh.named_parameters()) == names, "adapters were half-injected"


# --- configs and arguments ----------------------------------------------------------------------
BAD = st.one_of(st.sampled_from([0, -1, -3, 1.5, math.nan, math.inf, -math.inf, "x", "", True, False, None, [],
                                 {}, (1,), 10**30, -10**30, 1e300, -0.0]), json_values)


def _accepted(build, field: str):
    """build() -> its result when it accepts, None when it refuses with a ValueError/TypeError naming
    ``field``. Any other exception is not caught: it fails the test with its own traceback."""
    try:
        return build()
    except (ValueError, TypeError) as exc:
        assert field in str(exc), f"the message does not name {field!r}: {type(exc).__name__}: {exc}"
        return None


@given(field=st.sampled_from(["max_grad_norm", "keep_last", "checkpoint_every", "nonfinite", "progress",
                              "controllers"]), value=BAD)
def test_trainer_arguments(field, value):
    t, _ = W.build("full", "float32")
    kw = {field: value}
    if field == "checkpoint_every":
        kw["checkpoint_dir"] = "/nonexistent-never-written"
    _accepted(lambda: Trainer(t.model, t.optimizer, **kw), field)


@given(field=st.sampled_from(["batch_size", "seq_len", "seed"]), value=BAD)
def test_seeded_batches_arguments(field, value):
    kw = {"batch_size": 2, "seq_len": 4, "seed": 0, field: value}
    if _accepted(lambda: SeededBatches(np.arange(50), **kw), field) is not None:
        # accepted: it must be a value the docstring allows (batch_size, seq_len >= 1; seed >= 0)
        assert type(value) is int and value >= (0 if field == "seed" else 1), f"{field}={value!r} was accepted"


@given(data=st.one_of(json_values, st.just(np.zeros(5)), st.just(np.zeros((0,), np.int64)),
                      st.just({"input_ids": np.zeros((3, 2), np.int64), "labels": np.zeros(4, np.int64)})))
def test_seeded_batches_data(data):
    batches = _accepted(lambda: SeededBatches(data, 2, 4), "data")
    if batches is not None:  # accepted: it must yield well-formed integer batches
        batch = batches.batch(0)
        assert batch["input_ids"].dtype.kind == "i" and batch["input_ids"].shape[0] == 2


def _configs():
    out = []
    for mod, cls, base in (("spectral_peft.adapters.lora", "LoraConfig", {"target_modules": ["c_attn"]}),
                           ("spectral_peft.adapters.adalora", "AdaLoraConfig",
                            {"target_modules": ["c_attn"], "total_step": 10}),
                           ("spectral_peft.adapters.rosa", "RosaConfig", {"target_modules": ["c_attn"],
                                                                          "schedule": "wl1"})):
        out.append((mod, cls, base))
    return out


NUMERIC_FIELDS = {
    "LoraConfig": ["r", "lora_alpha", "lora_dropout"],
    "AdaLoraConfig": ["init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                      "total_step", "lora_alpha", "lora_dropout"],
    "RosaConfig": ["r", "d", "lora_alpha", "lora_dropout", "spa_num_grads"],
}


@pytest.mark.parametrize("mod,cls,base", _configs(), ids=[c[1] for c in _configs()])
@given(data=st.data())
def test_method_configs_range_check_every_field(mod, cls, base, data):
    config = getattr(importlib.import_module(mod), cls)
    field = data.draw(st.sampled_from(NUMERIC_FIELDS[cls]))
    value = data.draw(BAD)
    _accepted(lambda: config(**base, **{field: value}), field)


# --- batches -------------------------------------------------------------------------------------
@given(bad=st.sampled_from(["missing", "float", "range", "negative", "shape"]))
def test_bad_batches_are_refused_before_any_update(bad):
    t, b = W.build("full", "float32")
    batch = b.batch(0)
    if bad == "missing":
        batch = {"labels": batch["labels"]}
    elif bad == "float":
        batch["input_ids"] = batch["input_ids"].astype(np.float32)
    elif bad == "range":
        batch["input_ids"][0, 0] = W.V
    elif bad == "negative":
        batch["labels"][0, 1] = -7
    else:
        batch["labels"] = batch["labels"][:, :3]
    before = {n: m.params[k].copy() for n, m, k in t.model.named_parameters()}
    with pytest.raises((ValueError, TypeError)):
        t.train_step(batch)
    assert t.step == 0
    for n, m, k in t.model.named_parameters():
        assert np.array_equal(m.params[k], before[n])



# --- the CLI: `spectral-peft reference` on damaged files ----------------------------------------
@pytest.fixture(scope="module")
def ref_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("refmodel")
    model, _ = W.make_model(W.get_backend("cpu", "float64"), 0)
    save_pretrained(model, d)
    ids = np.random.default_rng(0).integers(0, W.V, size=(2, 6))
    inputs = safetensors_bytes({"input_ids": ids, "labels": ids})
    return d, inputs


@given(which=st.sampled_from(["inputs", "model.safetensors", "config.json"]), cut=st.integers(0, 10**6),
       junk=st.binary(max_size=40), mode=st.sampled_from(["truncate", "junk"]))
@fuzz
def test_reference_command_refuses_damaged_files_in_one_line(ref_dirs, tmp_path_factory, capsys, which, cut, junk,
                                                             mode):
    src, inputs = ref_dirs
    d = tmp_path_factory.mktemp("m")
    for name in os.listdir(src):
        (d / name).write_bytes((src / name).read_bytes())
    inp, out = d / "in.safetensors", d / "out.safetensors"
    inp.write_bytes(inputs)
    victim = inp if which == "inputs" else d / which
    raw = victim.read_bytes()
    damaged = raw[: cut % len(raw)] if mode == "truncate" else junk
    assume(damaged != raw)
    victim.write_bytes(damaged)
    capsys.readouterr()
    code = cli.main(["reference", "--model", str(d), "--inputs", str(inp), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code} for a damaged {which}: {err[-500:]}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


# --- every config field, every kind of bad value ---------------------------------------------------
CONFIG_CLASSES = [("spectral_peft.adapters.lora", "LoraConfig", {"target_modules": ["c_attn"]}),
                  ("spectral_peft.adapters.dylora", "DyLoraConfig", {"target_modules": ["c_attn"]}),
                  ("spectral_peft.adapters.lorafa", "LoraFAConfig", {"target_modules": ["c_attn"]}),
                  ("spectral_peft.adapters.deltalora", "DeltaLoraConfig", {"target_modules": ["c_attn"]}),
                  ("spectral_peft.adapters.adalora", "AdaLoraConfig", {"target_modules": ["c_attn"], "total_step": 10}),
                  ("spectral_peft.adapters.rosa", "RosaConfig", {"target_modules": ["c_attn"], "schedule": "wl1"}),
                  ("spectral_peft.model", "GPT2Config", {}), ("spectral_peft.model", "BertConfig", {})]
# Bad values by the field's annotation: each is outside what the field can mean.
BAD_BY_TYPE = {
    "bool": ["yes", 2, None],
    "int": [-1, 1.5, "8", None, True],
    "int | None": [-1, 1.5, "8", True],
    "float": [math.nan, math.inf, "0.1", None, True],
    "str": [1, None, "nonsense"],
    "str | None": [1, 1.5, ["a"]],
    "bool | str": [2, None, "nonsense"],
    "dict": [1, "x", [1]],
    "dict | None": [1, "x", [1]],
    "list[str] | None": [1, 1.5],
    "str | list[str] | None": [1, 1.5, [1]],
    "list[str] | str | None": [1, 1.5, [1]],
}
# Fields whose annotated type admits a value above but whose meaning does not (checked by hand).
FREE_TEXT = {"task_type", "mask_load_path", "mask_save_path", "rosa_dtype"}  # any str is a valid value




def _refuses(config, base, field, value) -> bool:
    """True when config(**base, field=value) raises ValueError/TypeError naming the field; False when
    it accepts the value or names something else. Any other exception fails the test where it is
    raised (e.g. an AttributeError from inside the config)."""
    try:
        config(**{**base, field: value})
    except (ValueError, TypeError) as exc:
        return field in str(exc)
    return False


@pytest.mark.parametrize("mod,cls,base", CONFIG_CLASSES, ids=[c[1] for c in CONFIG_CLASSES])
def test_every_config_field_refuses_bad_values_naming_the_field(mod, cls, base):
    """Each field, each bad value of its kind: ValueError/TypeError naming the field. Any bad
    value accepted (a new field left unchecked, say) fails here."""
    config = getattr(importlib.import_module(mod), cls)
    gaps = set()
    checked = 0
    for f in dataclasses.fields(config):
        for v in BAD_BY_TYPE.get(str(f.type), []):
            if f.name in FREE_TEXT and isinstance(v, str):
                continue
            checked += 1
            if not _refuses(config, base, f.name, v):
                gaps.add((cls, f.name, repr(v)))
    assert checked >= len(dataclasses.fields(config))  # every field got bad values of its kind
    gaps = sorted(gaps)
    assert not gaps, f"{len(gaps)} bad values accepted or refused without naming the field: {gaps[:10]}"


def test_a_negative_generator_word_is_refused_as_a_file_error(ckpt, tmp_path):
    """Found by the manifest fuzz: a generator state word of -1 made NumPy raise OverflowError
    from inside the loader; it is a FileFormatError naming the generator, before anything loads."""
    manifest = json.load(open(os.path.join(ckpt, "state.json")))
    gens = manifest["states"]["generators"]
    key = next(k for k, v in gens.items() if isinstance(v, dict) and "state" in v)
    gens[key]["state"]["state"] = -1
    for name in ("model.safetensors", "state.safetensors"):
        (tmp_path / name).write_bytes(open(os.path.join(ckpt, name), "rb").read())
    (tmp_path / "state.json").write_text(json.dumps(manifest))
    t, b = W.build(METHOD, "float32")
    before = {n: m.params[k].copy() for n, m, k in t.model.named_parameters()}
    with pytest.raises(FileFormatError, match=r"invalid generator state"):
        C.load_checkpoint(tmp_path, t.model, t.optimizer, t.schedule, t.controllers, data=b)
    assert all(np.array_equal(m.params[k], before[n]) for n, m, k in t.model.named_parameters())
