"""A real browser for the console tests: Debian's chromium driven by Playwright, pinned to the
lab manager's certificate, refusing any request that leaves the manager's origin."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import Browser, Page, Request, Route, sync_playwright

CHROMIUM = "/usr/bin/chromium"
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 390, "height": 844}

# Every visible form control must be named for a screen reader: a <label for>, a wrapping
# <label>, aria-label or aria-labelledby.
UNLABELLED_JS = """
() => Array.from(document.querySelectorAll('input, select, textarea'))
  .filter(e => e.type !== 'hidden')
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
               && !e.getAttribute('aria-labelledby'))
  .map(e => e.outerHTML)
"""
# Wider than the window: the page scrolls sideways (tables scroll inside their own box).
OVERFLOW_JS = "() => document.documentElement.scrollWidth - window.innerWidth"


def spki_pin(url: str) -> str:
    """The base64 SHA-256 of the server certificate's public key, as chromium's
    --ignore-certificate-errors-spki-list takes it: that one key is trusted, nothing else."""
    parts = urlsplit(url)
    pem = ssl.get_server_certificate((parts.hostname or "", parts.port or 443))
    key = x509.load_pem_x509_certificate(pem.encode()).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@dataclass
class Guarded:
    """Requests a page made, and those to another origin (aborted)."""

    origin: str
    seen: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def route(self, route: Route, request: Request) -> None:
        self.seen.append(f"{request.method} {request.url}")
        parts = urlsplit(request.url)
        if f"{parts.scheme}://{parts.netloc}" != self.origin and parts.scheme not in (
            "data",
            "blob",
        ):
            self.foreign.append(request.url)
            route.abort()
            return
        route.continue_()


@contextlib.contextmanager
def chromium(manager_url: str) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        raise AssertionError(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # chromium's sandbox refuses root
    if manager_url.startswith("https://"):
        args.append(f"--ignore-certificate-errors-spki-list={spki_pin(manager_url)}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def page_for(
    browser: Browser, origin: str, viewport: dict[str, int] = WIDE
) -> tuple[Page, Guarded]:
    ctx = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    guard = Guarded(origin)
    page.route("**/*", guard.route)
    return page, guard


def shots_dir(tmp: Path) -> Path:
    """``make screenshots`` keeps them (QMOTION_SCREENSHOTS=docs/console); else a temporary
    directory, so ``make test`` leaves the tree as it was."""
    where = os.environ.get("QMOTION_SCREENSHOTS")
    out = Path(where) if where else tmp / "shots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def shot(page: Page, where: Path, name: str) -> None:
    page.screenshot(path=str(where / f"{name}.png"), full_page=True)


def unlabelled(page: Page) -> list[str]:
    found: list[str] = page.evaluate(UNLABELLED_JS)
    return found


def overflow(page: Page) -> int:
    px: int = page.evaluate(OVERFLOW_JS)
    return px
