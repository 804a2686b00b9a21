"""The documentation cannot rot: every Python block in it runs, every public name is in it.

Each page's ```python blocks run in order in one namespace, like a notebook, in a fresh
interpreter (a page may need to set XLA flags before JAX starts). Run one page by hand with

    python tests/test_docs.py docs/guides/masks.md
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import eqx_attention

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted([*DOCS.rglob("*.md"), ROOT / "README.md"])

# A fenced block opens with ```python (possibly indented, inside an admonition; possibly with
# more backticks, to enclose a file that has fences of its own) and closes with the same
# fence at the same indentation.
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<lang>[\w+-]*)[^\n`]*$")
_SNIPPET = re.compile(r'^--8<-- "[^"]+"$')
_API_STUB = re.compile(r"^::: eqx_attention\.(\w+)\s*$", re.MULTILINE)


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    """`(first line number, code)` of each ```python block of a Markdown file."""
    return python_blocks_in(path.read_text(), str(path))


def python_blocks_in(text: str, source: str) -> list[tuple[int, str]]:
    """`(first line number, code)` of each ```python block of Markdown text (a page, a
    docstring); `source` names the text in errors."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent = opening["indent"]
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != indent + opening["fence"]:
            end += 1
        if end == len(lines):
            raise ValueError(f"{source}:{i + 1}: unclosed code fence")
        body = [line[len(indent) :] for line in lines[i + 1 : end]]
        # A block that only includes a file (`--8<--` snippets, the example programs) shows
        # code that its own tests run.
        if opening["lang"] == "python" and not all(_SNIPPET.match(b) for b in body):
            blocks.append((i + 2, "\n".join(body)))
        i = end + 1
    return blocks


def run_page(path: pathlib.Path) -> None:
    """Execute a page's Python blocks in order; tracebacks point at the Markdown lines."""
    namespace = {"__name__": "__main__"}
    for line, code in python_blocks(path):
        # Pad with newlines so the compiled code's line numbers are the page's.
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs(page):
    # The script's own folder, not the checkout, heads sys.path: put the checkout first, so
    # the pages run against this checkout's package and not whichever one is installed.
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    result = subprocess.run(
        [sys.executable, __file__, str(page)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{page} failed:\n{result.stdout}\n{result.stderr}"


def test_guides_have_code():
    # Guards the extraction itself: if it silently found nothing, no page would be run.
    guides = {p.relative_to(DOCS).as_posix() for p in PAGES_WITH_CODE if p.is_relative_to(DOCS)}
    assert {
        "index.md",
        "getting-started.md",
        "guides/masks.md",
        "guides/implementations.md",
        "guides/kv-cache.md",
        "guides/perceiver.md",
        "guides/sharding.md",
        "guides/migrating.md",
    } <= guides


def test_python_blocks_extraction(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nx = 1\n```\n```bash\nls\n```\n!!! note\n\n    ```python\n"
        '    y = x + 1\n    ```\n````python\n--8<-- "docs/examples/char_lm.py"\n````\n'
        '````python\nz = """\n```bash\nls\n```\n"""\n````\n'
    )
    assert python_blocks(page) == [
        (3, "x = 1"),
        (11, "y = x + 1"),
        (17, 'z = """\n```bash\nls\n```\n"""'),
    ]


def test_every_public_name_is_documented():
    stubs = [
        m for p in sorted((DOCS / "api").glob("*.md")) for m in _API_STUB.findall(p.read_text())
    ]
    assert sorted(stubs) == sorted(set(stubs)), "a name has more than one API entry"
    missing = set(eqx_attention.__all__) - set(stubs)
    extra = set(stubs) - set(eqx_attention.__all__)
    assert not missing, f"public names without an API entry in docs/api/: {sorted(missing)}"
    assert not extra, f"API entries for names not in eqx_attention.__all__: {sorted(extra)}"


def test_mask_figures(tmp_path):
    sys.path.insert(0, str(DOCS / "scripts"))
    try:
        import mask_figures
    finally:
        sys.path.pop(0)
    written = mask_figures.main(tmp_path)
    committed = {p.name for p in (DOCS / "images").glob("mask_*.png")}
    assert {p.name for p in written} == committed, "regenerate with docs/scripts/mask_figures.py"
    for path in written:
        assert path.read_bytes().startswith(b"\x89PNG")
    # Every committed figure is shown on some page.
    text = "".join(p.read_text() for p in DOCS.rglob("*.md"))
    assert all(f"images/{name}" in text for name in committed)


@pytest.mark.parametrize("wrapped", [True, False], ids=["object", "list"])
def test_plot_benchmarks(tmp_path, wrapped):
    # The shape benchmarks/attention.py writes; a bare list of rows is accepted too.
    rows = [
        {"implementation": impl, "T": t, "causal": causal, "fwd_ms": t / 100, "fwdbwd_ms": t / 30}
        for impl in ("eqx_attention", "eqx_attention[xla]", "jax.nn", "equinox-style")
        for t in (256, 1024, 4096)
        for causal in (False, True)
        if not (impl == "equinox-style" and t == 4096)  # a skipped measurement
    ]
    data = {"backend": "cpu", "device": "TFRT_CPU_0", "dtype": "float32", "rows": rows}
    results = tmp_path / "attention.json"
    results.write_text(json.dumps(data if wrapped else rows))
    out = tmp_path / "plot.png"
    subprocess.run(
        [sys.executable, DOCS / "scripts" / "plot_benchmarks.py", results, "--out", out],
        check=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.read_bytes().startswith(b"\x89PNG")


if __name__ == "__main__":
    run_page(pathlib.Path(sys.argv[1]))
