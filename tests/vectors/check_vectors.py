"""Checks the Standard Webhooks conformance vectors with implementations
other than the router's own, then checks the real router's ed25519
deliveries the same way.

    python tests/vectors/check_vectors.py [--binary target/debug/webhook-router]

1. Every vector of standard-webhooks.json: `v1a` with PyNaCl (libsodium's
   ed25519), `v1` with the `standardwebhooks` package (its Webhook.verify,
   with its clock check pointed at the vector's `now`) and with Python's
   hmac; each must agree with the vector's `valid`.
2. With --binary: starts the router on 127.0.0.1 (ephemeral ports), an HTTP
   listener on 127.0.0.1, creates an ed25519 webhook with grpcurl ($GRPCURL
   or grpcurl on PATH), reads its public key with GetWebhookSecret,
   publishes an event and verifies the delivered signature with PyNaCl; then
   rotates with a grace period and checks that the next delivery carries two
   `v1a` signatures, one per public key. No `whsk_` may appear in any answer
   or in the router's log.

Exits non-zero with a message on the first mismatch.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, TypeVar

import nacl.exceptions
import nacl.signing
import standardwebhooks

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "standard-webhooks.json"
TOLERANCE = 300  # seconds, as in the specification's libraries

ACCOUNT = 1010
ADMIN = "vectors-admin-" + secrets.token_hex(8)
INGEST = "vectors-ingest-" + secrets.token_hex(8)
ADMIN_SERVICE = "webhooks.v1.WebhookAdmin"
INGEST_SERVICE = "webhooks.v1.EventIngest"
EVENT = "COURSE_ENROLLMENT"  # built-in catalog, real-time
STARTUP_TIMEOUT = 60.0
DELIVERY_TIMEOUT = 30.0
ADDR = re.compile(r"\baddr=(\d{1,3}(?:\.\d{1,3}){3}:\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CheckFailure(Exception):
    pass


def fail(message: str) -> None:
    raise CheckFailure(message)


# --------------------------------------------------------------------------
# Verifiers
# --------------------------------------------------------------------------


def signed_content(msg_id: str, timestamp: int, payload: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + payload


def entries(header: str) -> list[tuple[str, bytes]]:
    """(identifier, signature bytes) of each well-formed entry."""
    out = []
    for entry in header.split(" "):
        if "," not in entry:
            continue
        scheme, b64 = entry.split(",", 1)
        try:
            out.append((scheme, base64.b64decode(b64, validate=True)))
        except (binascii.Error, ValueError):
            continue
    return out


def ed25519_verifies(public_key: str, header: str, msg_id: str, timestamp: int, payload: bytes) -> list[bool]:
    """For each `v1a` entry of the header: whether PyNaCl verifies it with `public_key` (`whpk_…`)."""
    if not public_key.startswith("whpk_"):
        fail(f"not a whpk_ public key: {public_key!r}")
    raw = base64.b64decode(public_key[len("whpk_"):], validate=True)
    if len(raw) != 32:
        fail(f"public key has {len(raw)} bytes, not 32")
    key = nacl.signing.VerifyKey(raw)
    content = signed_content(msg_id, timestamp, payload)
    results = []
    for scheme, sig in entries(header):
        if scheme != "v1a":
            continue
        try:
            key.verify(content, sig)
            results.append(True)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            results.append(False)
    return results


def v1a_valid(v: dict) -> bool:
    in_time = abs(v["now"] - v["timestamp"]) <= TOLERANCE
    # The published public key is that of the private key (PyNaCl's derivation).
    seed = base64.b64decode(v["private_key"][len("whsk_"):], validate=True)
    if len(seed) != 32:
        fail(f"private key of {v['note']!r} has {len(seed)} bytes, not a 32-byte seed")
    derived = "whpk_" + base64.b64encode(bytes(nacl.signing.SigningKey(seed).verify_key)).decode()
    if derived != v["public_key"]:
        fail(f"{v['note']!r}: public_key {v['public_key']} is not that of private_key ({derived})")
    sig_ok = any(ed25519_verifies(v["public_key"], v["signature"], v["msg_id"], v["timestamp"], v["payload"].encode()))
    return sig_ok and in_time


def v1_valid_standardwebhooks(v: dict) -> bool:
    """The standardwebhooks package's own verify. Its clock check reads the real
    clock; for a vector it is replaced by the same check against `now`."""
    wh = standardwebhooks.Webhook(v["secret"])

    def check_timestamp(header: str) -> datetime:
        ts = datetime.fromtimestamp(float(header), tz=timezone.utc)
        if abs(v["now"] - ts.timestamp()) > TOLERANCE:
            raise standardwebhooks.webhooks.WebhookVerificationError("timestamp out of tolerance")
        return ts

    wh._Webhook__verify_timestamp = check_timestamp  # name-mangled private method
    headers = {
        "webhook-id": v["msg_id"],
        "webhook-timestamp": str(v["timestamp"]),
        "webhook-signature": v["signature"],
    }
    try:
        wh.verify(v["payload"], headers, json_parse=False)
        return True
    except standardwebhooks.webhooks.WebhookVerificationError:
        return False
    except (ValueError, binascii.Error):
        # Malformed entries (no comma, not base64) raise these in 1.1.0.
        return False


def v1_valid_hmac(v: dict) -> bool:
    key = base64.b64decode(v["secret"][len("whsec_"):])
    expected = hmac.new(key, signed_content(v["msg_id"], v["timestamp"], v["payload"].encode()), hashlib.sha256).digest()
    # The package's sign() makes the same signature.
    signed = standardwebhooks.Webhook(v["secret"]).sign(
        v["msg_id"], datetime.fromtimestamp(v["timestamp"], tz=timezone.utc), v["payload"]
    )
    if signed != "v1," + base64.b64encode(expected).decode():
        fail(f"{v['note']!r}: standardwebhooks sign() {signed} differs from hmac")
    sig_ok = any(scheme == "v1" and hmac.compare_digest(sig, expected) for scheme, sig in entries(v["signature"]))
    return sig_ok and abs(v["now"] - v["timestamp"]) <= TOLERANCE


def check_vectors() -> None:
    doc = json.loads(VECTORS.read_text(encoding="utf-8"))
    if doc.get("version") != 1:
        fail(f"{VECTORS}: version {doc.get('version')!r}, expected 1")
    counts = {"v1": 0, "v1a": 0, "valid": 0, "invalid": 0}
    for i, v in enumerate(doc["vectors"]):
        scheme = v["scheme"]
        if scheme == "v1a":
            results = {"PyNaCl": v1a_valid(v)}
        elif scheme == "v1":
            results = {"standardwebhooks": v1_valid_standardwebhooks(v), "hmac": v1_valid_hmac(v)}
        else:
            fail(f"vector {i}: unknown scheme {scheme!r}")
        for who, got in results.items():
            if got != v["valid"]:
                fail(f"vector {i} ({v['note']}): {who} says valid={got}, the file says {v['valid']}")
        counts[scheme] += 1
        counts["valid" if v["valid"] else "invalid"] += 1
    print(
        f"vectors: {len(doc['vectors'])} checked ({counts['v1']} v1 with standardwebhooks and hmac, "
        f"{counts['v1a']} v1a with PyNaCl; {counts['valid']} valid, {counts['invalid']} invalid)"
    )


# --------------------------------------------------------------------------
# The real router
# --------------------------------------------------------------------------

T = TypeVar("T")


def wait_until(what: str, timeout: float, probe: Callable[[], Optional[T]], interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Listener:
    """An HTTP listener on 127.0.0.1 that records every POST and answers 200."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[tuple[dict[str, str], bytes]] = []
        me = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with me.lock:
                    me.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hooks"

    def wait_for(self, event_id: str) -> tuple[dict[str, str], bytes]:
        def probe():
            with self.lock:
                for headers, body in self.received:
                    if event_id.encode() in body:
                        return headers, body
            return None

        return wait_until(f"a delivery of {event_id} at {self.url}", DELIVERY_TIMEOUT, probe)


class Router:
    def __init__(self, binary: Path, workdir: Path):
        config = workdir / "webhook-router.toml"
        config.write_text(
            f"""listen = "127.0.0.1:0"
data_dir = {json.dumps(str(workdir / "data"))}

[delivery]
allow_private_targets = true
retry_initial_ms = 200

[[tokens]]
token = "{ADMIN}"
role = "admin"

[[tokens]]
token = "{INGEST}"
role = "ingest"
"""
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_ROUTER__")}
        env["RUST_LOG"] = "info"
        env["NO_COLOR"] = "1"
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.addr = ""

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self.lock:
                self.lines.append(ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\n"))

    def log(self) -> str:
        with self.lock:
            return "\n".join(self.lines)

    def wait_started(self) -> None:
        def probe() -> str:
            if self.proc.poll() is not None:
                fail(f"webhook-router exited with {self.proc.returncode} before serving:\n{self.log()}")
            with self.lock:
                for line in self.lines:
                    if "webhook-router serving" in line and ADDR.search(line):
                        return ADDR.search(line).group(1)
            return ""

        self.addr = wait_until("the router's `webhook-router serving ... addr=` log line", STARTUP_TIMEOUT, probe)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


class Grpc:
    def __init__(self, grpcurl: str, addr: str):
        self.grpcurl = grpcurl
        self.addr = addr
        self.answers: list[str] = []

    def call(self, token: str, method: str, request: dict) -> dict:
        cmd = [self.grpcurl, "-plaintext", "-max-time", "30", "-H", f"authorization: Bearer {token}",
               "-d", json.dumps(request), self.addr, method]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            fail(f"grpcurl {method} failed ({out.returncode}):\nstdout: {out.stdout}\nstderr: {out.stderr}")
        self.answers.append(out.stdout)
        if "whsk_" in out.stdout:
            fail(f"{method} answered with a private key (whsk_): {out.stdout}")
        return json.loads(out.stdout)

    def admin(self, rpc: str, request: dict) -> dict:
        return self.call(ADMIN, f"{ADMIN_SERVICE}/{rpc}", request)

    def publish(self, event_id: str) -> None:
        self.call(INGEST, f"{INGEST_SERVICE}/PublishEvents", {
            "account_id": ACCOUNT,
            "events": [{"event_id": event_id, "event_name": EVENT, "event_info": "vectors check",
                        "data": {"courseId": "course-1", "learnerId": "learner-1"}}],
        })


def check_delivery(headers: dict[str, str], body: bytes, keys: list[str]) -> list[list[bool]]:
    """Per v1a entry of the delivery's signature: which of `keys` verify it."""
    for h in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        if h not in headers:
            fail(f"the delivery lacks {h}: {headers}")
    ts = int(headers["webhook-timestamp"])
    if abs(time.time() - ts) > TOLERANCE:
        fail(f"webhook-timestamp {ts} is more than {TOLERANCE} s from now")
    header = headers["webhook-signature"]
    per_key = [ed25519_verifies(k, header, headers["webhook-id"], ts, body) for k in keys]
    n = len(per_key[0])
    if any(scheme != "v1a" for scheme, _ in entries(header)) or len(header.split(" ")) != n:
        fail(f"webhook-signature {header!r} is not only v1a signatures")
    return [[per_key[k][e] for k in range(len(keys))] for e in range(n)]


def check_router(binary: Path) -> None:
    grpcurl = os.environ.get("GRPCURL") or shutil.which("grpcurl")
    if not grpcurl:
        fail("grpcurl not found: set GRPCURL or put grpcurl on PATH")
    listener = Listener()
    with tempfile.TemporaryDirectory(prefix="vectors-") as tmp:
        router = Router(binary, Path(tmp))
        try:
            router.wait_started()
            g = Grpc(grpcurl, router.addr)
            created = g.admin("CreateWebhook", {"account_id": ACCOUNT, "webhook": {
                "name": "ed25519 check", "target_url": listener.url, "event_types": [EVENT],
                "auth": {"signature": {"algorithm": "SIGNATURE_ALGORITHM_ED25519"}},
            }})
            webhook = created["webhook"]
            algorithm = webhook.get("auth", {}).get("signature", {}).get("algorithm")
            if algorithm != "SIGNATURE_ALGORITHM_ED25519":
                fail(f"CreateWebhook answered algorithm {algorithm!r}: {created}")
            wid = webhook["id"]
            secret = g.admin("GetWebhookSecret", {"account_id": ACCOUNT, "webhook_id": wid})["secret"]
            if secret.get("algorithm") != "ED25519" or not secret.get("secret", "").startswith("whpk_"):
                fail(f"GetWebhookSecret of an ed25519 webhook: {secret}")
            first_key = secret["secret"]
            print(f"router: ed25519 webhook {wid}, public key {first_key}")

            g.publish("evt_vectors_1")
            headers, body = listener.wait_for("evt_vectors_1")
            verdicts = check_delivery(headers, body, [first_key])
            if verdicts != [[True]]:
                fail(f"the delivery's signature does not verify with {first_key}: {headers['webhook-signature']}")
            print("router: the delivered v1a signature verifies with PyNaCl")

            rotated = g.admin("RotateWebhookSecret", {"account_id": ACCOUNT, "webhook_id": wid,
                                                      "grace_period_seconds": 3600})["secret"]
            new_key = rotated.get("secret", "")
            if not new_key.startswith("whpk_") or new_key == first_key or not rotated.get("previousSecretExpireTime"):
                fail(f"RotateWebhookSecret with a grace period answered {rotated}")
            g.publish("evt_vectors_2")
            headers, body = listener.wait_for("evt_vectors_2")
            verdicts = check_delivery(headers, body, [new_key, first_key])
            # First the new key's signature, then the old one's; each verifies with its key only.
            if verdicts != [[True, False], [False, True]]:
                fail(f"after rotation, signatures x [new, old] key verify as {verdicts}: {headers['webhook-signature']}")
            print("router: after rotation two v1a signatures, verified with the new and the old public key")
        finally:
            router.stop()
            listener.server.shutdown()
        if "whsk_" in router.log():
            fail("the router's log holds a private key (whsk_)")
        print(f"router: no whsk_ in {len(g.answers)} RPC answers or in the log")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", type=Path, help="the router binary; without it only the vectors are checked")
    args = p.parse_args()
    try:
        check_vectors()
        if args.binary:
            check_router(args.binary)
    except CheckFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("standard webhooks vectors: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
