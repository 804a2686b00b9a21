"""Load the built site (site/) in headless Chromium and fail on errors or missing content.

    make docs-check                                  # builds the site, then runs this
    python docs/scripts/check_site.py [--site DIR] [--out DIR] [--browser PATH]

The site is served on 127.0.0.1 and each checked page is opened in a fresh headless Chromium
(Debian's `chromium` package), driven over the DevTools protocol on a pipe, so only the
standard library is needed. A page fails on an uncaught exception, a `console.error`, a
failed request or HTTP error for the site's own files, or a missing piece of rendered
content; requests to other hosts (the MathJax CDN) fail offline, so they are only reported.
A screenshot of each page is saved under --out (default: out/site-check/).
"""

import argparse
import base64
import contextlib
import fcntl
import json
import os
import pathlib
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]

# (path, screenshot name, JavaScript expressions that must all be true once the page loaded,
# element to scroll into view for the screenshot or None for the top of the page).
PAGES = [
    (
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
        None,
    ),
    (
        "/api/functional/",
        "api_functional",
        [
            # mkdocstrings rendered the signature, with its shape annotations, readably.
            "[...document.querySelectorAll('.doc-signature')].some(s =>"
            " s.textContent.includes('dot_product_attention(')"
            " && s.textContent.includes('query: Float[Array, \"q_seq num_heads qk_size\"]'))",
            # ...and the docstring's argument list and formula.
            "document.querySelector('.doc-contents').textContent.includes('Arguments:')",
            "document.querySelectorAll('.arithmatex').length > 0",
        ],
        None,
    ),
    (
        "/api/attention/",
        "api_attention",
        [
            # A class renders with its __init__ and __call__ signatures.
            "document.getElementById('eqx_attention.MultiheadAttention') !== null",
            "document.getElementById('eqx_attention.MultiheadAttention.__call__') !== null",
        ],
        None,
    ),
    (
        "/guides/masks/",
        "guide_masks",
        [
            # Every figure loaded (naturalWidth is 0 for a broken image).
            "document.querySelectorAll('article img').length >= 5",
            "[...document.querySelectorAll('article img')].every(i => i.complete"
            " && i.naturalWidth > 0)",
        ],
        "article img",
    ),
    (
        "/examples/char_lm/",
        "example_char_lm",
        [
            # The included script is one code block (its docstring's own fences must not
            # end it early): the usage block plus the source, and the source is all there.
            "document.querySelectorAll('article div.highlight').length === 2",
            "[...document.querySelectorAll('article div.highlight')].at(-1).textContent"
            ".includes('import eqx_attention as ea')",
        ],
        None,
    ),
]

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
    "--remote-debugging-pipe",
]


class DevTools:
    """Minimal Chrome DevTools protocol client over --remote-debugging-pipe (fds 3 and 4)."""

    def __init__(self, browser: str, user_data_dir: str):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_fds():
            # Chromium reads commands on fd 3 and writes replies on fd 4. Move both ends out
            # of the way first, in case one of them already is fd 3 or 4.
            high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [browser, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            preexec_fn=wire_fds,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, session: str | None = None, timeout: float = 30.0, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def drain(self, seconds: float) -> None:
        """Collect events for a while (late scripts, images, fonts)."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while True:
                self.events.append(self._read(deadline))

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("no message from Chromium")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def check_page(browser, base, path, name, checks, scroll_to, out: pathlib.Path):
    """Open one page; return (fatal problems, notes)."""
    problems, notes = [], []
    own_host = urllib.parse.urlsplit(base).netloc
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        tools = DevTools(browser, profile)
        try:
            target = tools.send("Target.createTarget", url="about:blank")["targetId"]
            session = tools.send("Target.attachToTarget", targetId=target, flatten=True)[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log", "Network"):
                tools.send(f"{domain}.enable", session=session)
            tools.send("Page.navigate", session=session, url=base + path)
            tools.wait_for("Page.loadEventFired", timeout=30)
            tools.drain(2.0)
            requests = {}
            for event in tools.events:
                method, params = event.get("method"), event.get("params", {})
                if method == "Network.requestWillBeSent":
                    requests[params["requestId"]] = params["request"]["url"]
                elif method == "Runtime.exceptionThrown":
                    details = params["exceptionDetails"]
                    text = details.get("exception", {}).get("description", details.get("text"))
                    problems.append(f"uncaught exception: {text}")
                elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
                    args = " ".join(
                        str(a.get("value", a.get("description"))) for a in params["args"]
                    )
                    problems.append(f"console.error: {args}")
                elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                    entry = params["entry"]
                    url = entry.get("url", "")
                    if entry.get("source") == "network" and _external(url, own_host):
                        notes.append(f"external request failed (offline?): {url}")
                    else:
                        problems.append(
                            f"console {entry.get('source')} error: {entry['text']} {url}"
                        )
                elif method == "Network.responseReceived":
                    response = params["response"]
                    if response["status"] >= 400 and not _external(response["url"], own_host):
                        problems.append(f"HTTP {response['status']}: {response['url']}")
                elif method == "Network.loadingFailed":
                    url = requests.get(params["requestId"], "?")
                    if _external(url, own_host):
                        notes.append(f"external request failed (offline?): {url}")
                    else:
                        problems.append(f"request failed ({params['errorText']}): {url}")
            for check in checks:
                result = tools.send(
                    "Runtime.evaluate", session=session, expression=check, returnByValue=True
                )
                if result.get("exceptionDetails") or result["result"].get("value") is not True:
                    problems.append(f"content check failed: {check}")
            if scroll_to is not None:
                tools.send(
                    "Runtime.evaluate",
                    session=session,
                    expression=f"document.querySelector({json.dumps(scroll_to)})"
                    ".scrollIntoView({block: 'center'})",
                )
                tools.drain(0.5)
            shot = tools.send("Page.captureScreenshot", session=session, format="png")
            screenshot = out / f"{name}.png"
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            notes.append(f"screenshot: {screenshot}")
        finally:
            tools.close()
    return problems, notes


def _external(url: str, own_host: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and parts.netloc != own_host


@contextlib.contextmanager
def serve(site: pathlib.Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A separate process rather than a thread: the browser is started with preexec_fn,
    # which is only safe in a single-threaded parent.
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=site,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/", timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        else:
            raise RuntimeError(f"the site server on {base} did not come up")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=pathlib.Path, default=ROOT / "site")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "out" / "site-check")
    parser.add_argument("--browser", default=None)
    args = parser.parse_args()
    browser = args.browser or shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium not found: apt-get install chromium", file=sys.stderr)
        return 2
    if not (args.site / "index.html").exists():
        print(f"{args.site}/index.html not found: run `make docs` first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    with serve(args.site) as base:
        for path, name, checks, scroll_to in PAGES:
            problems, notes = check_page(browser, base, path, name, checks, scroll_to, args.out)
            print(f"{'FAIL' if problems else 'ok'}  {path}")
            for line in problems:
                print(f"    error: {line}")
            for line in dict.fromkeys(notes):  # a failed request is reported twice
                print(f"    note:  {line}")
            failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
