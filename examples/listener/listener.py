#!/usr/bin/env python3
"""Reference webhook listener for webhook-router deliveries.

Verifies what a listener should verify before trusting a request:

* signature auth: the Standard Webhooks signature (``webhook-signature`` over
  ``webhook-id``, ``webhook-timestamp`` and the raw body), with the
  timestamp within 5 minutes of the local clock, using the
  ``standardwebhooks`` package (PyPI);
* Basic auth: the ``authorization`` header, compared in constant time.

It answers 204 when the request is genuine (the router then moves on), 401
when it is not (the router retries, so a misconfigured secret shows up as
retries instead of lost events), and drops duplicates: the router delivers
at least once, and a payload sent again keeps its ``webhook-id``.

Run it on its own (Python 3.9+, ``pip install standardwebhooks``):

    python3 listener.py --port 8000 --secret whsec_...
    python3 listener.py --port 8000 --basic-user erp --basic-password s3cret

or import ``WebhookListener`` (examples/python/example.py does).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import http.server
import json
import sys
import threading
from typing import Callable, Optional

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

# The router sends at most this much; refuse larger bodies unread.
MAX_BODY_BYTES = 16 * 1024 * 1024


def check_secret(secret: str) -> str:
    """Returns ``secret`` if it is a signing secret as GetWebhookSecret
    returns it (``whsec_`` and base64), else raises ValueError saying what
    is wrong, so a mistyped or placeholder secret fails at start instead of
    failing every request."""
    if not secret.startswith("whsec_"):
        raise ValueError(
            "the secret must be the whsec_... value from GetWebhookSecret "
            f"(got {secret[:12]!r}{'...' if len(secret) > 12 else ''})"
        )
    rest = secret[len("whsec_"):]
    try:
        key = base64.b64decode(rest.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        key = b""
    if not key:
        raise ValueError(
            "the part after whsec_ must be base64 (A-Z, a-z, 0-9, +, /, =), "
            "copied whole from GetWebhookSecret's \"secret\" field"
        )
    return secret


class WebhookListener:
    """An HTTP listener on ``host:port`` (port 0: any free port) that
    verifies each delivery and hands the events of genuine ones to
    ``on_event(event, delivery_id)``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: Optional[str] = None,
        basic_user: Optional[str] = None,
        basic_password: Optional[str] = None,
        on_event: Optional[Callable[[dict, str], None]] = None,
    ) -> None:
        self.secret = check_secret(secret) if secret is not None else None
        self.basic = (basic_user, basic_password) if basic_user is not None else None
        self.on_event = on_event or (lambda event, delivery_id: None)
        self.seen_deliveries: set[str] = set()
        self.rejected = 0
        self._lock = threading.Lock()
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                status, reason = listener._handle(self)
                self.send_response(status)
                self.send_header("content-type", "text/plain")
                self.end_headers()
                self.wfile.write(reason.encode() + b"\n")

            def log_message(self, format: str, *args) -> None:  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hooks"

    def start(self) -> "WebhookListener":
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def set_secret(self, secret: str) -> None:
        """Switches signature verification on, with this ``whsec_...`` secret."""
        check_secret(secret)
        with self._lock:
            self.secret = secret

    def _handle(self, req: http.server.BaseHTTPRequestHandler) -> tuple[int, str]:
        length = int(req.headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            return self._reject(413, "body too large")
        # The raw bytes exactly as received: the signature covers them.
        body = req.rfile.read(length)
        headers = {k.lower(): v for k, v in req.headers.items()}
        with self._lock:
            secret, basic = self.secret, self.basic
        if basic is not None:
            expected = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
            got = headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), expected.encode()):
                return self._reject(401, "bad basic credentials")
        if secret is not None:
            try:
                Webhook(secret).verify(body, headers, json_parse=False)
            except (WebhookVerificationError, ValueError) as e:
                return self._reject(401, f"bad signature: {e}")
        try:
            payload = json.loads(body)
            events = payload["events"]
        except (ValueError, KeyError, TypeError):
            return self._reject(400, "not a webhook-router payload")
        delivery_id = headers.get("webhook-id", "")
        with self._lock:
            duplicate = delivery_id in self.seen_deliveries
            self.seen_deliveries.add(delivery_id)
        if not duplicate:
            for event in events:
                self.on_event(event, delivery_id)
        return 204, "ok"

    def _reject(self, status: int, reason: str) -> tuple[int, str]:
        with self._lock:
            self.rejected += 1
        print(f"listener: rejected a request ({status}): {reason}", file=sys.stderr, flush=True)
        return status, reason


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--secret", help="whsec_... secret from GetWebhookSecret (signature auth)")
    p.add_argument("--basic-user", help="Basic auth username")
    p.add_argument("--basic-password", default="", help="Basic auth password")
    args = p.parse_args()
    if args.secret is not None:
        try:
            check_secret(args.secret)
        except ValueError as e:
            p.error(f"--secret: {e}")

    def show(event: dict, delivery_id: str) -> None:
        print(json.dumps({"delivery": delivery_id, **event}), flush=True)

    listener = WebhookListener(
        args.host, args.port, args.secret, args.basic_user, args.basic_password, show
    )
    print(f"listening on {listener.url}", file=sys.stderr, flush=True)
    try:
        listener.server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
