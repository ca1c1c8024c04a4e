"""Every ```python and ```bash block of README.md and docs/*.md runs as written, so a page that rots
fails here.

The convention (what a page's author writes):

- Each page runs in its own empty temporary folder (the working directory of every block), its
  blocks in page order, so a block may read the files an earlier block of the same page wrote.
- A ```python block runs in this process in a fresh namespace, as a script does
  (``__name__ == "__main__"``). A block whose first line is ``# NAME.py`` is also written to NAME.py
  in the page's folder, which is on ``sys.path``: a later block may ``import NAME``.
- A ```bash block runs with ``bash -eo pipefail`` in the page's folder; ``spectral-peft`` and
  ``python`` there are this checkout's (``python -m spectral_peft``, this interpreter).
- Fences in any other language, or none (output, equations), are not run.
- An HTML comment on the line just before a fence changes how its block runs:

  ``<!-- snippet: not run (REASON) -->``   the block is skipped; REASON must say why (needs a GPU,
                                          JAX, your own kernel, installs packages, takes minutes).
  ``<!-- snippet: continues -->``          runs in the namespace of the page's previous python block
                                          (one journey split by prose).
  ``<!-- snippet: given NAME, NAME -->``   the block uses things the page's prose describes but does
                                          not make; the test makes them in the page's folder or the
                                          namespace first. Known names: ``my-gpt2`` (a tiny GPT-2
                                          folder, config.json + model.safetensors, saved with
                                          spectral_peft.model.save_pretrained), ``tokens`` (a 1-D
                                          int64 array of 2,000 token ids in [0, 64), my-gpt2's
                                          vocabulary).

  Directives combine with ``;`` (``<!-- snippet: given my-gpt2; continues -->``).

A reason is words (two at least); a marker must sit on the line just before a fence; a fence's
language must be one the collector knows (python, bash, text, json or none), so a ```py or ```sh
block cannot slip past unrun. Blocks are small by rule (tiny models, a few steps): the whole file
runs in well under a minute on 2 cores (about 15 s of blocks, most of it importing torch,
transformers and PEFT once).
"""
from __future__ import annotations

import glob
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))

RUN_LANGUAGES = ("python", "bash")
KNOWN_LANGUAGES = RUN_LANGUAGES + ("", "text", "json")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(.*?)\s*-->\s*$")
NOT_RUN = re.compile(r"^not run \((.+)\)$")
GIVEN = re.compile(r"^given\s+(.+)$")
FILE_HEADER = re.compile(r"^# ([A-Za-z_][A-Za-z0-9_]*\.py)\s*$")
GIVEN_NAMES = ("my-gpt2", "tokens")
BASH_TIMEOUT_S = 120

# Blocks whose page does not carry their marker yet (the page is being edited elsewhere), as
# {(page, how the block's first line starts): reason}. Each entry must still match a block, so it
# goes stale loudly once the marker is in the page: then delete the entry.
PENDING_MARKERS: dict = {}  # (page, first line) -> reason, for a page that cannot carry its marker yet


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip: str | None = None  # the reason, when not run
    continues: bool = False
    given: tuple = ()

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _directives(text: str) -> list[str]:
    """``text`` split at the semicolons outside parentheses (a reason may hold its own)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == ";" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + [current.strip()]


def parse_marker(text: str, where: str) -> dict:
    """The directives of one ``<!-- snippet: ... -->`` comment; ValueError on an unknown one."""
    out = {"skip": None, "continues": False, "given": ()}
    for part in _directives(text):
        if m := NOT_RUN.match(part):
            out["skip"] = m.group(1).strip()
        elif part == "continues":
            out["continues"] = True
        elif m := GIVEN.match(part):
            names = tuple(n.strip() for n in m.group(1).split(","))
            unknown = [n for n in names if n not in GIVEN_NAMES]
            if unknown:
                raise ValueError(f"{where}: snippet marker gives unknown {unknown}; known: {GIVEN_NAMES}")
            out["given"] = names
        else:
            raise ValueError(f"{where}: unknown snippet directive {part!r} (expected 'not run (REASON)', "
                             "'continues' or 'given NAME, ...')")
    return out


def blocks_of(page: str, text: str | None = None) -> list[Block]:
    """Every fenced block of ``page`` (its ``text``, read from the file when None) in one of
    RUN_LANGUAGES, with its marker applied; ValueError on a malformed marker or fence."""
    if text is None:
        text = open(os.path.join(REPO, page), encoding="utf-8").read()
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if MARKER.match(line) and not (n + 1 < len(lines) and FENCE.match(lines[n + 1])):
            raise ValueError(f"{page}:{n + 1}: a snippet marker must be the line just before a fence")
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, language = m.group(1), m.group(2)
        start = i
        i += 1
        body = []
        while i < len(lines) and not (FENCE.match(lines[i]) and FENCE.match(lines[i]).group(2) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{page}:{start + 1}: fence never closed")
        i += 1  # past the closing fence
        if language not in KNOWN_LANGUAGES:
            raise ValueError(f"{page}:{start + 1}: fence language {language!r}; use one of {KNOWN_LANGUAGES}")
        if language not in RUN_LANGUAGES:
            continue
        block = Block(page, start + 1, language, "\n".join(body) + "\n")
        marker = MARKER.match(lines[start - 1]) if start > 0 else None
        if marker:
            for k, v in parse_marker(marker.group(1), block.where).items():
                setattr(block, k, v)
        first = body[0].strip() if body else ""
        pending = [why for (p, prefix), why in PENDING_MARKERS.items() if p == page and first.startswith(prefix)]
        if pending and not marker:
            block.skip = pending[0]
        out.append(block)
    return out


ALL_BLOCKS, PARSE_ERRORS = {}, {}
for _page in PAGES:  # a malformed page fails test_every_page_parses, not the whole collection
    try:
        ALL_BLOCKS[_page] = blocks_of(_page)
    except ValueError as exc:
        ALL_BLOCKS[_page], PARSE_ERRORS[_page] = [], str(exc)


def test_every_page_parses():
    assert not PARSE_ERRORS, PARSE_ERRORS


def test_the_collector_sees_the_pages_blocks():
    """Sanity of the collector itself: README's two set-up commands and its first script, and the
    three journeys of validating.md, are found."""
    readme = ALL_BLOCKS["README.md"]
    assert [b.language for b in readme] == ["bash", "bash", "python"]
    assert readme[2].code.startswith("import spectral_peft as sp")
    headers = [b.code.splitlines()[0] for b in ALL_BLOCKS["docs/validating.md"] if b.language == "python"]
    for name in ("make_case.py", "compare.py", "make_adapter.py", "compare_adapter.py", "my_lora.py",
                 "compare_mine.py"):
        assert f"# {name}" in headers


def test_the_markers_mean_what_the_docstring_says():
    text = "\n".join([
        "<!-- snippet: not run (needs a GPU; and CuPy) -->", "```python", "import cupy", "```", "prose",
        "```python", "x = 1", "```",
        "<!-- snippet: continues -->", "```python", "print(x)", "```",
        "<!-- snippet: given my-gpt2, tokens -->", "```bash", "ls my-gpt2", "```",
        "```", "output, not run", "```",
        "```text", "neither", "```"])
    blocks = blocks_of("page.md", text)
    assert [(b.line, b.language, b.skip, b.continues, b.given) for b in blocks] == [
        (2, "python", "needs a GPU; and CuPy", False, ()),
        (6, "python", None, False, ()),
        (10, "python", None, True, ()),
        (14, "bash", None, False, ("my-gpt2", "tokens"))]
    assert blocks[1].code == "x = 1\n"
    for bad in ("<!-- snippet: not run -->\n```python\nx\n```",         # no reason
                "<!-- snippet: given my-llama -->\n```python\nx\n```",  # unknown fixture
                "<!-- snippet: continues -->\n\n```python\nx\n```",     # not just before the fence
                "```py\nx\n```",                                        # a language the collector does not know
                "```python\nx\n"):                                      # never closed
        with pytest.raises(ValueError):
            blocks_of("page.md", bad)


def test_every_skipped_block_says_why():
    for blocks in ALL_BLOCKS.values():
        for b in blocks:
            if b.skip is not None:
                assert len(b.skip.split()) >= 2, f"{b.where}: 'not run' needs a reason in words, got {b.skip!r}"


def test_pending_markers_still_match_a_block():
    for (page, first), _ in PENDING_MARKERS.items():
        found = [b for b in ALL_BLOCKS[page] if b.code.lstrip().startswith(first) and b.skip is not None]
        assert found, f"PENDING_MARKERS entry for {page} matches no block any more: remove it"


def _given(name: str, folder: str, scope: dict) -> None:
    import spectral_peft as sp
    if name == "my-gpt2":
        cfg = sp.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
        sp.save_pretrained(sp.GPT2LMHeadModel(cfg, sp.get_backend("cpu", "float64"), seed=1),
                           os.path.join(folder, "my-gpt2"))
    elif name == "tokens":
        scope["tokens"] = np.random.default_rng(0).integers(0, 64, size=2000)
    else:  # parse_marker refuses unknown names
        raise AssertionError(name)


def _shims(folder: str) -> str:
    """A bin/ folder whose spectral-peft and python are this checkout's and this interpreter."""
    bin_dir = os.path.join(folder, ".bin")
    os.makedirs(bin_dir)
    for name, line in (("spectral-peft", f'exec "{sys.executable}" -m spectral_peft "$@"'),
                       ("python", f'exec "{sys.executable}" "$@"')):
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\n{line}\n")
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return bin_dir


def _run_bash(block: Block, folder: str, bin_dir: str) -> None:
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", block.code], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=BASH_TIMEOUT_S)
    assert proc.returncode == 0, (f"{block.where}: bash block exited {proc.returncode}\n{block.code}\n"
                                  f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")


RUNNABLE = [p for p in PAGES if any(b.skip is None for b in ALL_BLOCKS[p])]


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_blocks_run(page, tmp_path, monkeypatch):
    folder = str(tmp_path)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(folder)
    bin_dir = _shims(folder)
    modules_before = set(sys.modules)
    scope = None
    ran, runnable = 0, sum(b.skip is None for b in ALL_BLOCKS[page])
    try:
        for block in ALL_BLOCKS[page]:
            if block.skip is not None:
                continue
            ran += 1
            if block.language == "python" and (not block.continues or scope is None):
                scope = {"__name__": "__main__"}
            for name in block.given:
                _given(name, folder, scope if scope is not None else {})
            if block.language == "bash":
                _run_bash(block, folder, bin_dir)
                continue
            if m := FILE_HEADER.match(block.code.splitlines()[0]):
                with open(os.path.join(folder, m.group(1)), "w", encoding="utf-8") as f:
                    f.write(block.code)
            # the page's own code, as written; tracebacks name the page and line
            exec(compile("\n" * block.line + block.code, os.path.join(REPO, page), "exec"), scope)
        # every block raised nothing (a bash block's exit status is checked in _run_bash), and none was missed
        assert ran == runnable > 0, f"{page}: ran {ran} of its {runnable} runnable blocks"
    finally:
        for name in set(sys.modules) - modules_before:  # modules a block imported from the page's folder
            if (getattr(sys.modules[name], "__file__", None) or "").startswith(folder):
                del sys.modules[name]
