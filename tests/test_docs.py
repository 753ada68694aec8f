"""The documentation stays true: the site builds strictly and every runnable snippet runs.

A ```python block of ``docs/*.md`` runs unless the line just before it (blank lines aside) is
``<!-- no-run -->``. ``<!-- requires: NAME, ... -->`` there runs the block, and the rest of its
page, only when every NAME is a name in ``logix_func`` or an importable module (an optional
dependency such as ``transformers``); otherwise the page's test is skipped from there.
The blocks of a page run in order in one namespace, in a temporary working directory.
"""

import importlib.util
import inspect
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import logix_func

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"^<!--\s*(no-run|requires:\s*([\w\s,]+?))\s*-->$")


@dataclass(frozen=True)
class Block:
    line: int  # line of the first code line in the page, 1-based
    code: str
    run: bool
    requires: tuple[str, ...]


def code_blocks(text: str) -> list[Block]:
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip()
        previous = before.rsplit("\n", 1)[-1].strip()
        marker = MARKER.match(previous)
        if previous.startswith("<!--") and not marker:
            raise ValueError(f"unknown marker {previous!r} before the block at offset {m.start()}")
        run = not (marker and marker.group(1) == "no-run")
        requires = tuple(n.strip() for n in marker.group(2).split(",")) if marker and run else ()
        line = text.count("\n", 0, m.start(1)) + 1
        blocks.append(Block(line, m.group(1), run, requires))
    return blocks


def test_block_parsing():
    page = (
        "intro\n```python\na = 1\n```\n<!-- no-run -->\n\n```python\nb = 2\n```\n"
        "<!-- requires: logra, LogStore -->\n```python\nc = 3\n```\n```bash\nls\n```\n"
    )
    assert code_blocks(page) == [
        Block(3, "a = 1\n", True, ()),
        Block(8, "b = 2\n", False, ()),
        Block(12, "c = 3\n", True, ("logra", "LogStore")),
    ]
    with pytest.raises(ValueError, match="unknown marker"):
        code_blocks("<!-- norun -->\n```python\nx = 1\n```\n")


def available(name: str) -> bool:
    """``name`` is in ``logix_func`` or is an importable module."""
    return hasattr(logix_func, name) or importlib.util.find_spec(name) is not None


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small snippets; 2 shared cores
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_snippets_run(page, tmp_path, monkeypatch, one_thread):
    blocks = code_blocks(page.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for block in blocks:
        if not block.run:
            continue
        missing = [n for n in block.requires if not available(n)]
        if missing:
            pytest.skip(
                f"{ran} blocks ran; from line {block.line} on the page needs "
                f"{', '.join(missing)} (in logix_func or as a module)"
            )
        # Pad so that tracebacks point at the page's own lines.
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        exec(code, namespace)
        ran += 1
    if ran == 0:
        pytest.skip("no runnable python block")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    return out


def test_site_builds_strictly(site):
    assert (site / "index.html").is_file()
    influence_page = (site / "api" / "influence" / "index.html").read_text(encoding="utf-8")
    assert "Scores <code>[Q, N]</code> of every training row" in influence_page  # a docstring
    raw_roles = [p.name for p in site.rglob("*.html") if ":func:<code>" in p.read_text("utf-8")]
    assert not raw_roles, f"unconverted Sphinx roles (docs/hooks.py) in {raw_roles}"


def documented(site: Path) -> set[str]:
    """Identifiers in the site's object inventory (Sphinx ``objects.inv`` v2)."""
    raw = (site / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = raw.index(b"\n", header_end) + 1
    lines = zlib.decompress(raw[header_end:]).decode().splitlines()
    return {line.split(" ", 1)[0] for line in lines if line}


def test_every_public_name_has_an_api_entry(site):
    names = documented(site)
    missing = []
    for public in logix_func.__all__:
        obj = getattr(logix_func, public)
        if inspect.ismodule(obj):  # a sub-namespace: some of its members are documented
            if not any(name.startswith(f"{obj.__name__}.") for name in names):
                missing.append(f"{public} (no entry under {obj.__name__})")
            continue
        path = f"{obj.__module__}.{obj.__qualname__}"
        if path not in names:
            missing.append(f"{public} ({path})")
    assert not missing, f"public names missing from docs/api/*.md: {missing}"
