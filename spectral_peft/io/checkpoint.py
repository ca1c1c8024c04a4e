"""Training checkpoints: atomic on disk, validated in full before anything is installed.

A checkpoint is one directory ``<checkpoint_dir>/step-00000120/`` holding

    model.safetensors   every parameter of the model (frozen ones too: Delta-LoRA moves its base,
                        RoSA fills its values), under its dotted name
    state.safetensors   every array of the optimiser, the schedule, the controllers (AdaLoRA's
                        EMAs, RoSA's gradient sums and supports, ...) and the data source
    state.json          the manifest, written last: format, step, the SHA-256 of both files, the
                        non-array part of every state (nested JSON in which each array is a
                        reference ``{"__ndarray__": key}`` into state.safetensors), the state of
                        every random generator held by a module or controller (dropout streams,
                        DyLoRA's rank stream), each module's set of frozen parameters, and the
                        trainer's own counters.

Crash safety. The directory is first written as ``.tmp-step-00000120-<pid>/``, each file
atomically (temporary file, fsync, rename) and the manifest last; the directory is fsync'ed and
renamed to its final name, and the parent fsync'ed. A crash at any point leaves the previous
checkpoints untouched and at most a ``.tmp-*`` directory, which :func:`latest_checkpoint`
ignores and :func:`clean_partial` removes. Retention (``keep_last``) renames an old checkpoint to
``.trash-*`` before deleting it, so a crash mid-delete never leaves a half-deleted checkpoint
that looks complete.

Exact resume. Floats in JSON are written with ``repr`` (round-trip exact), NumPy scalars are
stored as 0-d arrays so they come back with their dtype, generator states are restored in place
(the generator object other modules share stays the same object), and parameters are copied into
the existing arrays (tied weights and the optimiser's references stay valid).

Nothing half-loaded. :func:`load_checkpoint` reads and checks every file (hashes, keys, shapes,
dtypes, generator kinds) before touching the model; it then snapshots the current state and, if a
component's own ``load_state_dict`` refuses its state, restores the snapshot and raises a
FileFormatError naming ``states.<component>``.

Shape legend: parameters and state arrays keep their own shapes and dtypes; nothing is reshaped.
A generator is found only as a direct attribute of a module or a controller (where every method
keeps its dropout and rank streams); one held elsewhere would not be restored.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import warnings
from collections.abc import Sequence

import numpy as np

from ..backend import device_of, get_backend, get_xp, is_device_array, to_device, to_host
from .safe import (FileFormatError, atomic_write_bytes, fsync_dir, parse_json, parse_safetensors,
                   safetensors_bytes, save_json)

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
MANIFEST_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")

# A test hook: called with the name of each file just written into the temporary directory
# (the kill tests pause the writer here). None in normal use.
_after_file_hook = None


def step_dir_name(step: int) -> str:
    return f"step-{int(step):08d}"


# ------------------------------------------------------------------------------------------------
# Encoding nested states (dicts, lists, scalars, arrays, generators) into JSON + arrays
# ------------------------------------------------------------------------------------------------
def _is_array(x) -> bool:
    return isinstance(x, np.ndarray) or is_device_array(x)


def encode_state(obj, prefix: str, arrays: dict, where: str = "state"):
    """``obj`` -> a JSON-able value; each array is copied to the host into ``arrays`` under a key
    starting with ``prefix`` and replaced by a reference. ``where`` names the position in errors."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, np.generic):  # a NumPy scalar keeps its dtype: a 0-d array
        key = f"{prefix}#{len(arrays)}"
        arrays[key] = np.asarray(obj).copy()
        return {"__npscalar__": key}
    if _is_array(obj):
        key = f"{prefix}#{len(arrays)}"
        arrays[key] = np.array(to_host(obj), copy=True)
        return {"__ndarray__": key, "device": device_of(obj)}
    if isinstance(obj, np.random.Generator):
        return {"__generator__": type(obj.bit_generator).__name__,
                "state": encode_state(obj.bit_generator.state, prefix, arrays, where)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, prefix, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, prefix, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, prefix, arrays, f"{where}[{k!r}]") for k, v in obj.items()}
        return {"__items__": [[encode_state(k, prefix, arrays, f"{where} key"),
                               encode_state(v, prefix, arrays, f"{where}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, (set, frozenset)):
        return {"__set__": [encode_state(v, prefix, arrays, where) for v in sorted(obj, key=repr)]}
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be checkpointed; state_dict() values must be "
                    "None, bool, int, float, str, NumPy scalars or arrays, generators, or lists/tuples/dicts of them")


def decode_state(obj, arrays: dict, path, where: str = "state"):
    """Inverse of :func:`encode_state`; a dangling reference raises FileFormatError naming it."""
    if isinstance(obj, list):
        return [decode_state(v, arrays, path, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__ndarray__" in obj or "__npscalar__" in obj:
        key = obj.get("__ndarray__", obj.get("__npscalar__"))
        if not isinstance(key, str) or key not in arrays:
            raise FileFormatError(path, f"{where} refers to array {key!r}, which state.safetensors does not hold",
                                  key=str(key))
        a = arrays[key]
        if "__npscalar__" in obj:
            return a[()] if a.ndim == 0 else a
        if obj.get("device") in ("gpu", "gpu-emulated"):
            return to_device(a, get_backend(obj["device"]))
        return a
    if "__tuple__" in obj:
        return tuple(decode_state(v, arrays, path, where) for v in obj["__tuple__"])
    if "__set__" in obj:
        return set(decode_state(v, arrays, path, where) for v in obj["__set__"])
    if "__items__" in obj:
        out = {}
        for pair in obj["__items__"]:
            if not isinstance(pair, list) or len(pair) != 2:
                raise FileFormatError(path, f"{where}: malformed item {pair!r:.80}")
            k = decode_state(pair[0], arrays, path, where)
            out[k if not isinstance(k, list) else tuple(k)] = decode_state(pair[1], arrays, path, where)
        return out
    if "__generator__" in obj:
        kind = obj["__generator__"]
        if kind not in ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"):
            raise FileFormatError(path, f"{where}: unknown bit generator {kind!r}")
        g = np.random.Generator(getattr(np.random, kind)())
        try:
            g.bit_generator.state = decode_state(obj.get("state"), arrays, path, where)
        except (TypeError, ValueError, KeyError) as exc:
            raise FileFormatError(path, f"{where}: invalid {kind} state ({exc})") from None
        return g
    return {k: decode_state(v, arrays, path, f"{where}[{k!r}]") for k, v in obj.items()}


# ------------------------------------------------------------------------------------------------
# Random generators held by modules and controllers
# ------------------------------------------------------------------------------------------------
def _generators_of(obj, prefix: str, out: dict, seen: set) -> None:
    for name, value in vars(obj).items():
        if isinstance(value, np.random.Generator) and id(value) not in seen:
            seen.add(id(value))
            out[f"{prefix}{name}"] = value
        elif type(value).__module__.startswith("cupy") and type(value).__name__ == "Generator":
            warnings.warn(f"{prefix}{name} is a CuPy generator, whose state cannot be saved: a resumed GPU "
                          "run draws different dropout masks", RuntimeWarning, stacklevel=3)


def collect_generators(model, controllers: Sequence = ()) -> dict:
    """{"module:<dotted path>.<attribute>" or "controller:<i>.<attribute>": Generator} for every
    NumPy generator held directly by a module of ``model`` or by a controller (each object once)."""
    out: dict = {}
    seen: set = set()
    for path, m in model.named_modules():
        _generators_of(m, f"module:{path}." if path else "module:", out, seen)
    for i, c in enumerate(controllers):
        _generators_of(c, f"controller:{i}.", out, seen)
    return out


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def _component_state(obj):
    return None if obj is None else obj.state_dict()


def save_checkpoint(directory, step: int, model, optimizer=None, schedule=None, controllers: Sequence = (),
                    data=None, trainer_state: dict | None = None, keep_last: int | None = None) -> str:
    """Write the checkpoint of ``step`` atomically under ``directory``; returns its path.

    model: a Module; optimizer / schedule / data: objects with state_dict() (or None);
    controllers: Controllers; trainer_state: JSON-able counters of the loop.
    keep_last: after a successful write, delete all but the newest ``keep_last`` checkpoints.
    """
    if type(step) is not int or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
        raise ValueError(f"keep_last must be None or an int >= 1, got {keep_last!r}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)

    # Everything is gathered (and copied to the host) before anything is written.
    params = {name: m.params[k] for name, m, k in model.named_parameters()}
    arrays: dict = {}
    states = {
        "optimizer": encode_state(_component_state(optimizer), "optimizer", arrays, "optimizer.state_dict()"),
        "schedule": encode_state(_component_state(schedule), "schedule", arrays, "schedule.state_dict()"),
        "controllers": [encode_state(c.state_dict(), f"controller.{i}", arrays, f"controllers[{i}].state_dict()")
                        for i, c in enumerate(controllers)],
        "data": encode_state(_component_state(data), "data", arrays, "data.state_dict()"),
        "trainer": encode_state(trainer_state or {}, "trainer", arrays, "trainer_state"),
    }
    gens = {k: g.bit_generator.state for k, g in collect_generators(model, controllers).items()}
    states["generators"] = encode_state(gens, "generators", arrays, "generators")
    model_bytes = safetensors_bytes(params)
    state_bytes = safetensors_bytes(arrays)
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "files": {MODEL_FILE: hashlib.sha256(model_bytes).hexdigest(),
                  STATE_FILE: hashlib.sha256(state_bytes).hexdigest()},
        "parameters": {name: [list(p.shape), str(p.dtype)] for name, p in params.items()},
        "frozen": {path: sorted(m.frozen) for path, m in model.named_modules() if m.params},
        "states": states,
    }

    final = os.path.join(directory, step_dir_name(step))
    tmp = os.path.join(directory, f".tmp-{step_dir_name(step)}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for name, payload in ((MODEL_FILE, model_bytes), (STATE_FILE, state_bytes)):
        atomic_write_bytes(os.path.join(tmp, name), payload)
        if _after_file_hook is not None:
            _after_file_hook(name)
    save_json(manifest, os.path.join(tmp, MANIFEST_FILE), sort_keys=False)  # last: its presence marks completeness
    if _after_file_hook is not None:
        _after_file_hook(MANIFEST_FILE)
    fsync_dir(tmp)
    if os.path.exists(final):  # re-saving a step (after a resume): move the old one aside first
        _discard(final)
    os.rename(tmp, final)
    fsync_dir(directory)
    if keep_last is not None:
        for _, old in list_checkpoints(directory)[:-keep_last]:
            _discard(old)
    return final


def _discard(path: str) -> None:
    """Delete a checkpoint directory crash-safely: rename it out of the step-* namespace first."""
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f".trash-{name}-{os.getpid()}")
    os.rename(path, trash)
    fsync_dir(parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_partial(directory) -> list[str]:
    """Remove the ``.tmp-*`` and ``.trash-*`` leftovers of interrupted writes; returns their names."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        if name.startswith(".tmp-step-") or name.startswith(".trash-step-"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            removed.append(name)
    return removed


def list_checkpoints(directory) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint (a step-* directory holding its manifest), oldest first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        m = _STEP_DIR.match(name)
        path = os.path.join(directory, name)
        if m and os.path.isfile(os.path.join(path, MANIFEST_FILE)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(directory) -> str | None:
    """The newest complete checkpoint under ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
class Checkpoint:
    """A checkpoint read from disk and fully validated: ``step``, ``params`` (name -> array),
    ``states`` (decoded), ``frozen``, ``path``."""

    def __init__(self, path, step, params, states, frozen):
        self.path, self.step, self.params, self.states, self.frozen = path, step, params, states, frozen


def _read(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileFormatError(path, "file not found (incomplete checkpoint)") from None
    except OSError as exc:
        raise FileFormatError(path, f"cannot be read ({exc.strerror})") from None


def read_checkpoint(path) -> Checkpoint:
    """Read and validate every file of the checkpoint directory ``path`` (no model needed)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileFormatError(path, "is not a checkpoint directory")
    mpath = os.path.join(path, MANIFEST_FILE)
    manifest = parse_json(_read(mpath), mpath)
    if not isinstance(manifest, dict):
        raise FileFormatError(mpath, f"must hold a JSON object, got {type(manifest).__name__}")
    for key, types in (("format", int), ("step", int), ("files", dict), ("parameters", dict),
                       ("frozen", dict), ("states", dict)):
        if key not in manifest:
            raise FileFormatError(mpath, "missing", key=key)
        if not isinstance(manifest[key], types) or isinstance(manifest[key], bool):
            raise FileFormatError(mpath, f"expected {types.__name__}, got {type(manifest[key]).__name__}", key=key)
    if manifest["format"] != FORMAT_VERSION:
        raise FileFormatError(mpath, f"checkpoint format {manifest['format']}, this engine reads {FORMAT_VERSION}",
                              key="format")
    raws = {}
    for name in (MODEL_FILE, STATE_FILE):
        fpath = os.path.join(path, name)
        raw = _read(fpath)
        want = manifest["files"].get(name)
        if hashlib.sha256(raw).hexdigest() != want:
            raise FileFormatError(fpath, f"SHA-256 differs from the one recorded in {MANIFEST_FILE} "
                                         "(the file is corrupted or was replaced)")
        raws[name] = raw
    params, _ = parse_safetensors(raws[MODEL_FILE], os.path.join(path, MODEL_FILE))
    arrays, _ = parse_safetensors(raws[STATE_FILE], os.path.join(path, STATE_FILE))
    for name, spec in manifest["parameters"].items():
        if name not in params:
            raise FileFormatError(os.path.join(path, MODEL_FILE), "missing", key=name)
        if (not isinstance(spec, list) or len(spec) != 2 or list(params[name].shape) != spec[0]
                or str(params[name].dtype) != spec[1]):
            raise FileFormatError(os.path.join(path, MODEL_FILE), f"shape/dtype {list(params[name].shape)} "
                                  f"{params[name].dtype} differ from the manifest's {spec!r:.80}", key=name)
    st = manifest["states"]
    for key in ("optimizer", "schedule", "controllers", "data", "trainer", "generators"):
        if key not in st:
            raise FileFormatError(mpath, "missing", key=f"states.{key}")
    if not isinstance(st["controllers"], list):
        raise FileFormatError(mpath, "expected a list", key="states.controllers")
    if not isinstance(st["generators"], dict):
        raise FileFormatError(mpath, "expected an object", key="states.generators")
    spath = os.path.join(path, STATE_FILE)
    try:
        states = {k: decode_state(v, arrays, spath, f"states.{k}") for k, v in st.items()}
    except FileFormatError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:  # e.g. an unhashable key
        raise FileFormatError(mpath, f"malformed states ({type(exc).__name__}: {exc})", key="states") from None
    return Checkpoint(path, manifest["step"], params, states, manifest["frozen"])


def _snapshot(obj):
    """A deep copy of obj.state_dict() that survives later in-place updates."""
    if obj is None:
        return None
    arrays: dict = {}
    enc = encode_state(obj.state_dict(), "snap", arrays)
    return decode_state(enc, arrays, "<snapshot>")


def _check_parameters(ckpt: Checkpoint, live: dict, modules: dict) -> None:
    """Every parameter of the model in the checkpoint, with its shape and dtype, and every frozen
    set naming parameters of a module that exists; FileFormatError naming the key otherwise."""
    mfile = os.path.join(ckpt.path, MODEL_FILE)
    mpath = os.path.join(ckpt.path, MANIFEST_FILE)
    missing = sorted(set(live) - set(ckpt.params))
    extra = sorted(set(ckpt.params) - set(live))
    if missing:
        raise FileFormatError(mfile, f"missing: the model has {len(live)} parameters, the checkpoint "
                                     f"{len(ckpt.params)} (is it from another model or method?)", key=missing[0])
    if extra:
        raise FileFormatError(mfile, "is not a parameter of this model (is the checkpoint from another model "
                                     "or method?)", key=extra[0])
    for name, (m, k) in live.items():
        p, a = m.params[k], ckpt.params[name]
        if tuple(p.shape) != tuple(a.shape) or np.dtype(p.dtype) != a.dtype:
            raise FileFormatError(mfile, f"shape {tuple(a.shape)} dtype {a.dtype}; the model's parameter is "
                                         f"{tuple(p.shape)} {p.dtype}", key=name)
    for mod_path, names in ckpt.frozen.items():
        if (mod_path not in modules or not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                or not set(names) <= set(modules[mod_path].params)):
            raise FileFormatError(mpath, f"frozen set {names!r:.80} does not fit this model", key=f"frozen.{mod_path}")


def _check_states(ckpt: Checkpoint, components: dict, controllers: Sequence, gens: dict) -> None:
    """A state for exactly the components the run has, and generator states of the run's kinds."""
    mpath = os.path.join(ckpt.path, MANIFEST_FILE)
    if len(ckpt.states["controllers"]) != len(controllers):
        raise FileFormatError(mpath, f"holds {len(ckpt.states['controllers'])} controller states; the run has "
                                     f"{len(controllers)} controllers", key="states.controllers")
    for name, obj in components.items():
        if (ckpt.states[name] is None) != (obj is None):
            what = "no state" if ckpt.states[name] is None else "a state"
            raise FileFormatError(mpath, f"holds {what} for the {name}, but the run has "
                                         f"{'one' if obj is not None else 'none'}", key=f"states.{name}")
    saved = ckpt.states["generators"]
    if sorted(saved) != sorted(gens):
        raise FileFormatError(mpath, f"saved generators {sorted(saved)[:4]} differ from the run's "
                                     f"{sorted(gens)[:4]}", key="states.generators")
    for key, g in gens.items():
        s = saved[key]
        if not isinstance(s, dict) or s.get("bit_generator") != type(g.bit_generator).__name__:
            raise FileFormatError(mpath, f"generator state is for {s.get('bit_generator') if isinstance(s, dict) else s!r}, "
                                         f"the run's is {type(g.bit_generator).__name__}", key=f"states.generators.{key}")
        try:  # a malformed state is refused here, before anything is installed
            type(g.bit_generator)().state = s
        except (TypeError, ValueError, KeyError, OverflowError) as exc:  # OverflowError: a negative or > 2^64 word
            raise FileFormatError(mpath, f"invalid generator state ({exc})", key=f"states.generators.{key}") from None


def load_checkpoint(path, model, optimizer=None, schedule=None, controllers: Sequence = (), data=None) -> Checkpoint:
    """Restore everything ``save_checkpoint`` wrote into live objects; returns the Checkpoint
    (``.step``, ``.states["trainer"]``).

    ``path`` may also be a Checkpoint already returned by :func:`read_checkpoint`. Every file, key,
    shape, dtype and generator is checked before the model is touched; if a component's own
    load_state_dict then refuses its state, every component is rolled back.
    """
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    live = {name: (m, k) for name, m, k in model.named_parameters()}
    modules = dict(model.named_modules())
    components = {"optimizer": optimizer, "schedule": schedule, "data": data}
    gens = collect_generators(model, controllers)
    _check_parameters(ckpt, live, modules)
    _check_states(ckpt, components, controllers, gens)

    # --- install, with a snapshot to roll back to ---
    snap_params = {name: np.array(to_host(m.params[k]), copy=True) for name, (m, k) in live.items()}
    snap_frozen = {p: set(m.frozen) for p, m in modules.items()}
    snap_states = [(_snapshot(o), o) for o in (optimizer, schedule, data, *controllers)]
    snap_gens = {k: g.bit_generator.state for k, g in gens.items()}
    part = "parameters"
    try:
        for name, (m, k) in live.items():
            m.params[k][...] = get_xp(m.params[k]).asarray(ckpt.params[name])
        for mod_path, names in ckpt.frozen.items():
            modules[mod_path].frozen = set(names)
            for n in names:
                modules[mod_path].grads.pop(n, None)
        for part, obj in components.items():
            if obj is not None:
                obj.load_state_dict(ckpt.states[part])
        for i, (c, s) in enumerate(zip(controllers, ckpt.states["controllers"])):
            part = f"controllers.{i}"
            c.load_state_dict(s)
        part = "generators"
        for key, g in gens.items():  # last: a controller's load may have re-seeded its own stream
            g.bit_generator.state = ckpt.states["generators"][key]
    except Exception as exc:
        for name, (m, k) in live.items():
            m.params[k][...] = get_xp(m.params[k]).asarray(snap_params[name])
        for p, m in modules.items():
            m.frozen = snap_frozen[p]
        for state, obj in snap_states:
            if obj is not None:
                obj.load_state_dict(state)
        for key, g in gens.items():
            g.bit_generator.state = snap_gens[key]
        if isinstance(exc, (ValueError, TypeError, KeyError, IndexError, AttributeError)):
            # The component's own check refused its saved state: name the file and the state.
            raise FileFormatError(os.path.join(ckpt.path, MANIFEST_FILE),
                                  f"refused by {part}.load_state_dict ({type(exc).__name__}: {exc}); "
                                  "nothing was loaded", key=f"states.{part}") from exc
        raise
    return ckpt


__all__ = [
    "FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "read_checkpoint", "list_checkpoints",
    "latest_checkpoint", "clean_partial", "collect_generators", "encode_state", "decode_state", "Checkpoint",
]
