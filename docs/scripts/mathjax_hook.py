"""mkdocs hook: serve MathJax from the site itself, so formulas render without network.

MathJax 3.2.2 comes from PyPI's `django-static-mathjax` (the `docs` extra): the release's
browser build, es5/, built from its source tree (the same files as npm's `mathjax-full`
3.2.2, but for the minifier's output in those that bundle the speech-rule engine). The
parts a page can load are added to the site under `javascripts/mathjax/`, where
`extra_javascript` in mkdocs.yml points; nothing is committed and no page asks another host
for anything.
"""

import importlib.metadata
import pathlib

from mkdocs.structure.files import File, Files

DISTRIBUTION = "django-static-mathjax"
DEST = "javascripts/mathjax"
# The combined component the pages load, and what it loads on demand: the CommonHTML fonts,
# TeX extensions (autoloaded by macro), and the accessibility pieces its context menu
# offers (assistive MathML, the explorer, speech rules).
PARTS = ["tex-mml-chtml.js", "output/chtml", "input/tex/extensions", "ui", "a11y", "sre"]


def _es5() -> pathlib.Path:
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"MathJax not found: pip install '.[docs]' ({DISTRIBUTION})") from None
    return pathlib.Path(distribution.locate_file("mathjax/static/mathjax/es5"))


def on_files(files: Files, config) -> Files:
    es5 = _es5()
    for part in PARTS:
        path = es5 / part
        if not path.exists():
            raise RuntimeError(f"{DISTRIBUTION} has no {part} in {es5}")
        sources = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for source in sources:
            uri = f"{DEST}/{source.relative_to(es5).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files
