"""The embedded default data: real text every Python installation has, with no download.

Two corpora are cut, deterministically, from the Python standard library installed with the
interpreter that runs the engine:

- **pretraining** (the base model's language): the *source code* of the modules in
  :data:`PRETRAIN_MODULES`, with every docstring removed (so the base model learns Python syntax,
  identifiers and comments, but never sees prose written as documentation);
- **fine-tuning** (the shifted task): the *docstrings* of the modules in :data:`FINETUNE_MODULES`
  (a disjoint list), each cleaned with :func:`inspect.cleandoc`; every ``EVAL_EVERY``-th docstring
  goes to the held-out evaluation split, the others to the training split.

The selection depends only on the module lists below and on the installed interpreter's files, so
two runs on one machine see byte-identical text; :func:`Corpus.summary` reports the modules, byte
counts and a SHA-256 of the text so that the output says exactly what was used. When a module's
source file is missing (a "stripped" installation ships only .pyc files), the module's docstrings
are read from the imported objects instead and the summary says so.

Text is tokenised by :class:`ByteTokenizer`: one token per UTF-8 byte, vocabulary 256, nothing to
train and nothing to download.

Shape legend: B batch, T sequence length, L tokens in a stream.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import os
import sysconfig
from dataclasses import dataclass, field

import numpy as np

# Pure-Python standard-library modules present in CPython 3.10 to 3.13 (none is deprecated for
# removal), whose source is code-heavy: the base model's pretraining text.
PRETRAIN_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "difflib", "enum", "fractions", "functools", "gettext", "heapq", "ipaddress",
    "json.decoder", "json.encoder", "locale", "logging", "netrc", "operator", "optparse",
    "pprint", "queue", "random", "sched", "secrets", "shlex", "shutil", "statistics", "string",
    "tempfile", "textwrap", "tokenize", "traceback", "types", "typing", "uuid", "weakref",
    "zipfile",
)
# A disjoint list whose docstrings (prose about programs) make the fine-tuning task.
FINETUNE_MODULES = (
    "abc", "codecs", "collections", "colorsys", "datetime", "decimal", "email.message",
    "email.utils", "filecmp", "fnmatch", "ftplib", "getopt", "glob", "gzip", "hashlib", "hmac",
    "html.parser", "http.client", "http.cookies", "imaplib", "inspect", "mailbox", "mimetypes",
    "numbers", "os", "pathlib", "pickle", "platform", "plistlib", "poplib", "posixpath", "pydoc",
    "quopri", "smtplib", "socket", "socketserver", "ssl", "stat", "subprocess", "tarfile",
    "threading", "timeit", "unittest.case", "urllib.parse", "urllib.request", "wave",
    "xml.dom.minidom", "zipimport",
)
EVAL_EVERY = 8          # every 8th docstring is held out: ~12% evaluation split
MIN_DOCSTRING_CHARS = 40  # one-line stubs ("Return self.") carry little text


class ByteTokenizer:
    """One token per UTF-8 byte: ``encode(str) -> (L,) int64`` ids in [0, 256), ``decode`` back."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def _module_source(name: str) -> str | None:
    """The source text of the standard-library module ``name``, or None when it has no .py file."""
    # The library folder first: some modules (os, abc, codecs, ...) are imported "frozen", so
    # their import spec names no file even though the .py file is installed.
    stdlib = sysconfig.get_paths()["stdlib"]
    rel = name.replace(".", os.sep)
    candidates = [os.path.join(stdlib, rel + ".py"), os.path.join(stdlib, rel, "__init__.py")]
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin and spec.origin.endswith(".py"):
        candidates.append(spec.origin)
    for path in candidates:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError:
            continue
    return None


def _docstring_nodes(tree: ast.AST):
    """Every module/class/function docstring node of ``tree``, in source order."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                yield body[0]


def strip_docstrings(source: str) -> str:
    """``source`` with the lines of every docstring removed (code and comments kept)."""
    tree = ast.parse(source)
    drop = set()
    for node in _docstring_nodes(tree):
        drop.update(range(node.lineno, node.end_lineno + 1))
    lines = source.splitlines(keepends=True)
    return "".join(line for i, line in enumerate(lines, start=1) if i not in drop)


def docstrings_of_source(source: str) -> list[str]:
    """The cleaned docstrings of ``source``, in source order, dropping short ones."""
    tree = ast.parse(source)
    out = []
    for node in sorted(_docstring_nodes(tree), key=lambda n: (n.lineno, n.col_offset)):
        text = inspect.cleandoc(node.value.value)
        if len(text) >= MIN_DOCSTRING_CHARS:
            out.append(text)
    return out


def docstrings_of_module_objects(name: str) -> list[str]:
    """Fallback without source files: docstrings of the imported module and its members."""
    module = importlib.import_module(name)
    out = []
    objs = [module] + [v for _, v in sorted(vars(module).items())
                       if getattr(v, "__module__", None) == module.__name__]
    for obj in objs:
        doc = inspect.getdoc(obj) if isinstance(getattr(obj, "__doc__", None), str) else None
        if doc and len(doc) >= MIN_DOCSTRING_CHARS:
            out.append(doc)
    return out


@dataclass
class Corpus:
    """A tokenised text stream and the record of where it came from.

    Attributes:
        name: "pretrain", "finetune-train" or "finetune-eval".
        text: the text (documents joined by a blank line).
        tokens: (L,) int64 byte ids of ``text``.
        modules: the standard-library modules it was read from.
        from_objects: modules whose text came from imported objects (no source file).
    """

    name: str
    text: str
    tokens: np.ndarray
    modules: list[str]
    from_objects: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "modules": list(self.modules),
            "modules_without_source": list(self.from_objects),
            "bytes": len(self.text.encode("utf-8")),
            "tokens": int(self.tokens.size),
            "sha256": hashlib.sha256(self.text.encode("utf-8")).hexdigest(),
        }


def pretrain_corpus(max_bytes: int | None = None) -> Corpus:
    """Docstring-free source of :data:`PRETRAIN_MODULES`, cut at ``max_bytes`` (None: all)."""
    parts, used, from_objects = [], [], []
    for name in PRETRAIN_MODULES:
        src = _module_source(name)
        if src is None:
            # No .py file: keep at least the module's prose so the corpus is never empty.
            docs = docstrings_of_module_objects(name)
            if not docs:
                continue
            parts.append("\n\n".join(docs))
            from_objects.append(name)
        else:
            parts.append(strip_docstrings(src))
        used.append(name)
    text = "\n\n".join(parts)
    if max_bytes is not None:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    if not text:
        raise RuntimeError("no standard-library text could be read for pretraining "
                           f"(modules tried: {', '.join(PRETRAIN_MODULES)})")
    return Corpus("pretrain", text, ByteTokenizer().encode(text), used, from_objects)


def finetune_corpora(max_bytes: int | None = None) -> tuple[Corpus, Corpus]:
    """(train, eval) corpora of the docstrings of :data:`FINETUNE_MODULES`.

    Docstrings are numbered across all modules in list order; number i goes to eval when
    ``i % EVAL_EVERY == 0``. ``max_bytes`` caps the training text (eval is kept whole).
    """
    docs, used, from_objects = [], [], []
    for name in FINETUNE_MODULES:
        src = _module_source(name)
        if src is None:
            found = docstrings_of_module_objects(name)
            from_objects.append(name)
        else:
            found = docstrings_of_source(src)
        if found:
            used.append(name)
            docs.extend(found)
    if len(docs) < EVAL_EVERY:
        raise RuntimeError(f"only {len(docs)} docstrings found in {FINETUNE_MODULES}; need >= {EVAL_EVERY}")
    train_docs = [d for i, d in enumerate(docs) if i % EVAL_EVERY != 0]
    eval_docs = [d for i, d in enumerate(docs) if i % EVAL_EVERY == 0]
    train_text = "\n\n".join(train_docs)
    if max_bytes is not None:
        train_text = train_text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    eval_text = "\n\n".join(eval_docs)
    tok = ByteTokenizer()
    return (Corpus("finetune-train", train_text, tok.encode(train_text), used, from_objects),
            Corpus("finetune-eval", eval_text, tok.encode(eval_text), used, from_objects))


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """``batch_size`` random windows of ``seq_len`` tokens: (L,) -> (B, T) int64 input ids.

    GPT-2 language-model labels are the inputs themselves (the model shifts them inside, as
    Hugging Face does). ``rng`` is a host generator, so the sequence of batches is reproducible.
    """
    if tokens.size <= seq_len:
        raise ValueError(f"a stream of {tokens.size} tokens is too short for seq_len={seq_len}")
    starts = rng.integers(0, tokens.size - seq_len, size=batch_size)      # (B,)
    return np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int64)  # (B, T)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> list[np.ndarray]:
    """Consecutive, non-overlapping windows of ``seq_len`` from the start of ``tokens``, grouped into
    at most ``max_batches`` batches of (B, T): a fixed evaluation set, the same for every method."""
    n_windows = min(tokens.size // seq_len, batch_size * max_batches)
    if n_windows < 1:
        raise ValueError(f"a stream of {tokens.size} tokens is too short for seq_len={seq_len}")
    windows = tokens[:n_windows * seq_len].reshape(n_windows, seq_len).astype(np.int64)  # (n, T)
    return [windows[i:i + batch_size] for i in range(0, n_windows, batch_size)]
