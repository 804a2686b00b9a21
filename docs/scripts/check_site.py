"""Load the built site (site/) offline in headless Chromium; fail on errors or missing content.

    make docs-check                                  # builds the site, then runs this
    python docs/scripts/check_site.py [--site DIR] [--out DIR] [--browser PATH]

Playwright (the `docs-check` extra) drives Debian's `chromium` (`apt-get install chromium`),
never a browser of its own. The site is served on 127.0.0.1 and every request to another
host is refused, as on a machine without network. A page fails on an uncaught exception, a
console error, a failed request or HTTP error, or a piece of rendered content that does not
appear within a few seconds: formulas must be typeset by the MathJax the site serves itself.
A screenshot of each page is saved under --out (default: out/site-check/).
"""

import argparse
import contextlib
import functools
import http.server
import pathlib
import shutil
import sys
import threading
import urllib.parse
from typing import NamedTuple

from playwright.sync_api import Error as PlaywrightError, sync_playwright

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Every formula was typeset: each `.arithmatex` element that pymdownx.arithmatex wrapped
# around one holds MathJax's output, and no raw TeX (a backslash) is left in its text.
MATH = [
    "document.querySelectorAll('.arithmatex').length > 0",
    r"[...document.querySelectorAll('.arithmatex')].every(e =>"
    r" e.querySelector('mjx-container') !== null && !e.textContent.includes('\\'))",
]


class Page(NamedTuple):
    path: str
    name: str  # of the screenshot
    checks: list[str]  # JavaScript expressions that must all become true
    scroll_to: str | None = None  # element to centre for the screenshot; None: the top


PAGES = [
    Page(
        "/",
        "home",
        [
            "document.querySelector('article h1').textContent.includes('eqx_attention')",
            # The navigation lists the guides and the API reference.
            "document.querySelector('nav.md-nav--primary').textContent.includes('API reference')",
            "document.querySelector('nav.md-nav--primary a[href*=\"api/functional\"]') !== null",
            # Code blocks got syntax highlighting.
            "document.querySelectorAll('.highlight code .kn').length > 0",
        ],
    ),
    Page(
        "/api/functional/",
        "api_functional",
        [
            # mkdocstrings rendered the signature, with its shape annotations, readably.
            "[...document.querySelectorAll('.doc-signature')].some(s =>"
            " s.textContent.includes('dot_product_attention(')"
            " && s.textContent.includes('query: Inexact[Array, \"q_seq num_heads qk_size\"]'))",
            # ...and the docstring's argument list and its `$\mathrm{softmax}(...)$` formula.
            "document.querySelector('.doc-contents').textContent.includes('Arguments:')",
            *MATH,
            r"!document.querySelector('article').innerText.includes('\\mathrm')",
        ],
        ".arithmatex",
    ),
    Page(
        "/api/attention/",
        "api_attention",
        [
            # A class renders with its __init__ and __call__ signatures.
            "document.getElementById('eqx_attention.MultiheadAttention') !== null",
            "document.getElementById('eqx_attention.MultiheadAttention.__call__') !== null",
            # MultiheadAttention's docstring has a display formula.
            *MATH,
            "document.querySelector('mjx-container[display=\"true\"]') !== null",
        ],
        ".arithmatex",
    ),
    Page("/api/positional/", "api_positional", MATH, ".arithmatex"),
    Page("/api/recurrent/", "api_recurrent", MATH, ".arithmatex"),
    Page(
        "/guides/masks/",
        "guide_masks",
        [
            # Every figure loaded (naturalWidth is 0 for a broken image).
            "document.querySelectorAll('article img').length >= 5",
            "[...document.querySelectorAll('article img')].every(i => i.complete"
            " && i.naturalWidth > 0)",
            # The attention-sinks formula.
            *MATH,
        ],
        "article img",
    ),
    Page(
        "/examples/char_lm/",
        "example_char_lm",
        [
            # The included script is one code block (its docstring's own fences must not
            # end it early): the usage block plus the source, and the source is all there.
            "document.querySelectorAll('article div.highlight').length === 2",
            "[...document.querySelectorAll('article div.highlight')].at(-1).textContent"
            ".includes('import eqx_attention as ea')",
        ],
    ),
]


def check_page(browser, base: str, page: Page, out: pathlib.Path) -> list[str]:
    """Open one page in a fresh browser context; return what went wrong."""
    problems = []
    own_host = urllib.parse.urlsplit(base).netloc

    def offline(route):
        if urllib.parse.urlsplit(route.request.url).netloc == own_host:
            route.continue_()
        else:
            problems.append(f"request to another host: {route.request.url}")
            route.abort("internetdisconnected")

    def on_console(message):
        if message.type == "error":
            problems.append(f"console error: {message.text}")

    def on_response(response):
        if response.status >= 400:
            problems.append(f"HTTP {response.status}: {response.url}")

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        context.route("**/*", offline)
        tab = context.new_page()
        tab.on("pageerror", lambda error: problems.append(f"uncaught exception: {error}"))
        tab.on("console", on_console)
        tab.on("response", on_response)
        tab.on(
            "requestfailed",
            lambda request: problems.append(f"request failed ({request.failure}): {request.url}"),
        )
        tab.goto(base + page.path)
        tab.wait_for_load_state("networkidle")
        for check in page.checks:
            try:
                tab.wait_for_function(check, timeout=5_000)
            except PlaywrightError:
                problems.append(f"content check failed: {check}")
        if page.scroll_to is not None:
            tab.locator(page.scroll_to).first.evaluate("e => e.scrollIntoView({block: 'center'})")
            tab.wait_for_timeout(500)
        tab.screenshot(path=out / f"{page.name}.png")
    finally:
        context.close()
    # A failed request is reported by more than one event.
    return list(dict.fromkeys(problems))


@contextlib.contextmanager
def serve(site: pathlib.Path):
    """Serve `site` on a free port of 127.0.0.1 and yield its base URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(site))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=pathlib.Path, default=ROOT / "site")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "out" / "site-check")
    parser.add_argument("--browser", default=None, help="default: chromium on the PATH")
    args = parser.parse_args()
    browser_path = args.browser or shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        print("chromium not found: apt-get install chromium", file=sys.stderr)
        return 2
    if not (args.site / "index.html").exists():
        print(f"{args.site}/index.html not found: run `make docs` first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    with serve(args.site) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            for page in PAGES:
                problems = check_page(browser, base, page, args.out)
                print(f"{'FAIL' if problems else 'ok'}  {page.path}")
                for line in problems:
                    print(f"    error: {line}")
                failed = failed or bool(problems)
        finally:
            browser.close()
    print(f"screenshots: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
