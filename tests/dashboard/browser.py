"""Headless Chromium for the page tests: run it, parse the DOM it dumps, and catch any request
it makes beyond the loopback interface (a recording proxy that answers nothing)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
from html.parser import HTMLParser
from types import TracebackType
from urllib.parse import urlsplit

import pytest

# Elements that never hold text or children in the dumped DOM.
_VOID = {
    *("meta", "link", "br", "img", "input", "hr", "col", "area", "base", "embed", "source"),
    *("track", "wbr", "line", "circle", "rect", "path"),
}


# Chromium's own services (updates, sign-in, network time) that it calls whatever the page:
# not the page's requests. Exact host names, so fonts.googleapis.com etc. still count.
BROWSER_SERVICE_HOSTS = frozenset(
    {
        "update.googleapis.com",
        "accounts.google.com",
        "clients2.google.com",
        "content-autofill.googleapis.com",
    }
)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "headless Chromium is needed: `apt-get install -y chromium` "
            "(make test installs it when run as root)"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_chromium(*args: str, proxy: str | None = None) -> subprocess.CompletedProcess[str]:
    """Chromium with a fresh profile; with ``proxy``, every request to a host other than the
    loopback interface goes to that proxy (Chromium never proxies loopback)."""
    network = [f"--proxy-server={proxy}"] if proxy else []
    with tempfile.TemporaryDirectory(prefix="bprr-chromium-") as profile:
        command = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,"
            "AutofillServerCommunication",
            "--no-pings",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            *network,
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


class NoNetwork:
    """A proxy on 127.0.0.1 that records the first line of every request sent to it and
    closes the connection: the browser sees no network, the test sees what it tried."""

    def __init__(self) -> None:
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self._server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2)
                try:
                    first = connection.recv(4096).split(b"\r\n", 1)[0]
                except OSError:
                    first = b"(no request line)"
                self.requests.append(first.decode("latin-1"))

    def page_requests(self) -> list[str]:
        """The recorded requests, less those of Chromium's own services."""
        out = []
        for line in self.requests:
            parts = line.split()
            target = parts[1] if len(parts) > 1 else ""
            host = (
                target.rsplit(":", 1)[0] if parts[:1] == ["CONNECT"] else urlsplit(target).hostname
            )
            if host not in BROWSER_SERVICE_HOSTS:
                out.append(line)
        return out

    def __enter__(self) -> NoNetwork:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.close()


class Dom(HTMLParser):
    """Elements by id (their text) and every element's attributes, from the dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text_by_id: dict[str, str] = {}
        self.text = ""
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.elements.append((tag, values))
        if tag not in _VOID:
            self._open.append(values.get("id"))
            if values.get("id"):
                self.text_by_id.setdefault(values["id"], "")

    def handle_endtag(self, tag: str) -> None:
        if self._open and tag not in _VOID:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        self.text += data
        for element_id in self._open:
            if element_id:
                self.text_by_id[element_id] += data

    def with_class(self, tag: str, *classes: str) -> list[dict[str, str]]:
        return [
            attrs
            for name, attrs in self.elements
            if name == tag and set(classes) <= set(attrs.get("class", "").split())
        ]

    def external_resources(self, origin: str) -> list[str]:
        """Every src / stylesheet href / srcset that names a URL outside ``origin``."""
        found = []
        for tag, attrs in self.elements:
            urls = [attrs.get("src", ""), attrs.get("srcset", ""), attrs.get("data", "")]
            if tag == "link":
                urls.append(attrs.get("href", ""))
            for url in urls:
                if "//" in url and not url.startswith(origin) and not url.startswith("data:"):
                    found.append(f"<{tag}> {url}")
        return found


def parse(html: str) -> Dom:
    dom = Dom()
    dom.feed(html)
    return dom
