"""Headless Chromium for tests that must see a page the way a browser does, with the network off.

`find_or_install_chromium()` returns the path of a `chromium` binary: `$CHROMIUM` if set, else the first of
`chromium`, `chromium-browser` on PATH, else it installs Debian's `chromium` package (`apt-get update && apt-get
install -y chromium`, as root or through passwordless sudo) and fails the calling test with a clear message if
that is impossible. It never skips.

`Browser.load(path, screenshot=...)` runs one headless Chromium on a local file and returns the DOM after load,
the console messages (with `--enable-logging=stderr --v=0` Chromium writes them to stderr) and the problems
among them (uncaught exceptions, CSP violations), the network requests the page made (from a NetLog: every one is
a failed resource load, since nothing is reachable), and optionally a screenshot drawn in the same run.

Use the `chromium` fixture (session scope): `from tests.support.browser import chromium  # noqa: F401`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser")
INSTALL_TIMEOUT_S = 1200
_LOCK = os.path.join(tempfile.gettempdir(), "unifilter-chromium-install.lock")

# Flags for a browser that can reach nothing: no proxy-less fetch (the proxy is a closed port), no name resolves,
# no background services, a fresh profile per run.
OFFLINE_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-default-apps", "--disable-features=MediaRouter,OptimizationHints,Translate",
    "--metrics-recording-only", "--mute-audio", "--hide-scrollbars",
    "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--host-resolver-rules=MAP * ~NOTFOUND",
    "--enable-logging=stderr", "--v=0",
)

# What in a console line means the page did not load cleanly.
PROBLEMS = re.compile(
    r"Uncaught|Refused to|Content[- ]Security[- ]Policy|Failed to load resource|net::ERR_|SyntaxError|"
    r"TypeError|ReferenceError|Not allowed to load local resource", re.IGNORECASE)
_CONSOLE = re.compile(r"(?:CONSOLE\(\d+\)|:CONSOLE:|console_message|Console message)", re.IGNORECASE)


def _which() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _install() -> None:
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n", "--preserve-env=DEBIAN_FRONTEND"]
    else:
        pytest.fail("Chromium is not installed and this user can neither install it (not root, no passwordless "
                    "sudo). Install it first: `sudo apt-get update && sudo apt-get install -y chromium` (or point "
                    "$CHROMIUM at a Chromium binary).", pytrace=False)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        try:
            proc = subprocess.run(prefix + cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            pytest.fail(f"installing Chromium failed: `{' '.join(cmd)}`: {err}", pytrace=False)
        if proc.returncode != 0:
            pytest.fail(f"installing Chromium failed: `{' '.join(cmd)}` exited {proc.returncode}:\n"
                        f"{(proc.stderr or proc.stdout)[-2000:]}", pytrace=False)


def find_or_install_chromium() -> str:
    """The path of a Chromium binary, installing Debian's package when there is none (one installer at a time,
    across processes)."""
    path = _which()
    if path:
        return path
    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            path = _which()  # another process may have installed it while we waited
            if not path:
                _install()
                path = _which()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if not path:
        pytest.fail("`apt-get install -y chromium` succeeded but no `chromium` binary is on PATH", pytrace=False)
    return path


@dataclass
class PageLoad:
    dom: str  # the serialised DOM after load (`--dump-dom`)
    stderr: str  # everything Chromium logged
    console: list[str] = field(default_factory=list)  # the console messages among it
    problems: list[str] = field(default_factory=list)  # lines naming an error, a CSP violation or a failed load
    requests: list[str] = field(default_factory=list)  # network requests the page itself made (`--log-net-log`)
    screenshot: Path | None = None
    seconds: float = 0.0


def page_requests(net_log: str) -> list[str]:
    """The URLs of the network requests a `file://` page made, from a Chromium NetLog (JSON). Chromium's own
    background requests (updates, time, accounts) are told apart by their network isolation key, which names the
    top frame's site: `file://` for the page's loads. Every one of them fails here (the proxy is a closed port), so
    the page's own requests are exactly its failed resource loads."""
    try:
        with open(net_log, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        pytest.fail("Chromium wrote no NetLog (--log-net-log), so its network requests cannot be checked",
                    pytrace=False)
    text = text.rstrip().rstrip(",")
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut short (the browser was killed): close its events list
        log = json.loads(text + "]}")
    types = {v: k for k, v in log.get("constants", {}).get("logEventTypes", {}).items()}
    urls = []
    for event in log.get("events", []):
        params = event.get("params") or {}
        if types.get(event.get("type")) != "URL_REQUEST_START_JOB" or "url" not in params:
            continue
        if "file://" in str(params.get("network_isolation_key", "")) + str(params.get("site_for_cookies", "")):
            urls.append(params["url"])
    return urls


class Browser:
    def __init__(self, binary: str):
        self.binary = binary

    def version(self) -> str:
        proc = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=60)
        return (proc.stdout or proc.stderr).strip()

    def load(self, page: str | os.PathLike, screenshot: str | os.PathLike | None = None,
             window: tuple[int, int] = (1280, 2400), timeout: float = 90.0) -> PageLoad:
        """Open a local file offline; dump its DOM and, with `screenshot`, draw it into that PNG in the same run."""
        url = Path(page).resolve().as_uri()
        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
            net_log = os.path.join(profile, "netlog.json")
            args = [self.binary, *OFFLINE_FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
                    f"--log-net-log={net_log}", "--dump-dom"]
            if screenshot is not None:
                args.append(f"--screenshot={Path(screenshot).resolve()}")
            env = dict(os.environ, HOME=profile, XDG_CONFIG_HOME=profile, XDG_CACHE_HOME=profile)
            for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
                env.pop(key, None)
            start = time.monotonic()
            try:
                proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=timeout, env=env,
                                      stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as err:
                pytest.fail(f"Chromium did not finish loading {url} within {timeout:.0f} s: "
                            f"{(err.stderr or b'')[-2000:]!r}", pytrace=False)
            seconds = time.monotonic() - start
            if proc.returncode != 0:
                pytest.fail(f"Chromium exited {proc.returncode} on {url}:\n{proc.stderr[-3000:]}", pytrace=False)
            requests = page_requests(net_log)
        lines = proc.stderr.splitlines()
        console = [line for line in lines if _CONSOLE.search(line)]
        problems = [line for line in lines if PROBLEMS.search(line) and (_CONSOLE.search(line) or "net::" in line
                                                                         or "Refused" in line)]
        problems += [f"the page requested {u} (a failed resource load: the network is off)" for u in requests]
        shot = Path(screenshot) if screenshot is not None else None
        if shot is not None and not shot.exists():
            pytest.fail(f"Chromium wrote no screenshot for {url}:\n{proc.stderr[-3000:]}", pytrace=False)
        return PageLoad(proc.stdout, proc.stderr, console, problems, requests, shot, seconds)


@pytest.fixture(scope="session")
def chromium() -> Browser:
    """A headless Chromium (installed on first use when missing); fails, never skips, when there can be none."""
    return Browser(find_or_install_chromium())
