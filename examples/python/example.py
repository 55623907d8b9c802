#!/usr/bin/env python3
"""webhook-router from Python, with a client generated from proto/.

Creates two webhooks pointing at listeners of its own on 127.0.0.1 (one
signed the Standard Webhooks way, one with Basic auth), publishes events
with PublishEvents and StreamEvents, waits until every event has arrived
and been verified (the signature with the `standardwebhooks` package and
the secret from GetWebhookSecret), checks that forged requests are refused,
then deletes the webhooks. Exits non-zero on any failure.

    pip install -r requirements.txt && ./generate.sh
    ADMIN_TOKEN=… INGEST_TOKEN=… python3 example.py --router 127.0.0.1:50051

The router must allow loopback targets
(WEBHOOK_ROUTER__DELIVERY__ALLOW_PRIVATE_TARGETS=true).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "generated"))
sys.path.insert(0, str(HERE.parent / "listener"))

import grpc  # noqa: E402

try:
    from webhooks.v1 import (  # noqa: E402
        admin_pb2,
        admin_pb2_grpc,
        ingest_pb2,
        ingest_pb2_grpc,
        resources_pb2,
    )
except ImportError as e:
    sys.exit(f"error: generated code missing ({e}); run ./generate.sh first")

from listener import WebhookListener  # noqa: E402

EVENT_TYPES = ["COURSE_ENROLLMENT", "COURSE_COMPLETED"]


class Received:
    """Events a listener accepted, by event id."""

    def __init__(self) -> None:
        self.events: dict[str, dict] = {}
        self.cond = threading.Condition()

    def add(self, event: dict, delivery_id: str) -> None:
        with self.cond:
            self.events[event["eventId"]] = event
            self.cond.notify_all()

    def wait_for(self, ids: set[str], timeout: float) -> set[str]:
        """Waits until every id arrived; returns the ones still missing."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not ids <= self.events.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return ids - self.events.keys()


def event(event_id: str, name: str, user_id: int) -> ingest_pb2.Event:
    e = ingest_pb2.Event(
        event_id=event_id,
        event_name=name,
        timestamp=int(time.time() * 1000),
        event_info="sent by examples/python/example.py",
    )
    e.data.update({"userId": user_id, "loId": f"course:{user_id}"})
    return e


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)
    print(f"ok: {what}")


def run(args: argparse.Namespace) -> None:
    channel = grpc.insecure_channel(args.router)
    grpc.channel_ready_future(channel).result(timeout=10)
    admin = admin_pb2_grpc.WebhookAdminStub(channel)
    ingest = ingest_pb2_grpc.EventIngestStub(channel)
    as_admin = [("authorization", f"Bearer {args.admin_token}")]
    as_ingest = [("authorization", f"Bearer {args.ingest_token}")]
    account = args.account

    signed_seen, basic_seen = Received(), Received()
    signed = WebhookListener(on_event=signed_seen.add).start()
    basic = WebhookListener(
        basic_user="example", basic_password="pw-" + uuid.uuid4().hex, on_event=basic_seen.add
    ).start()
    created: list[str] = []
    try:
        w = admin.CreateWebhook(
            admin_pb2.CreateWebhookRequest(
                account_id=account,
                webhook=resources_pb2.Webhook(
                    name="python-example-signed",
                    target_url=signed.url,
                    event_types=EVENT_TYPES,
                    auth=resources_pb2.WebhookAuth(signature=resources_pb2.SignatureAuth()),
                ),
            ),
            metadata=as_admin,
        ).webhook
        created.append(w.id)
        print(f"created {w.id} -> {w.target_url}")
        secret = admin.GetWebhookSecret(
            admin_pb2.GetWebhookSecretRequest(account_id=account, webhook_id=w.id),
            metadata=as_admin,
        ).secret
        check(secret.secret.startswith("whsec_"), "GetWebhookSecret returned a whsec_ secret")
        check(secret.signature_header == "webhook-signature", "signature header is webhook-signature")
        signed.set_secret(secret.secret)

        b = admin.CreateWebhook(
            admin_pb2.CreateWebhookRequest(
                account_id=account,
                webhook=resources_pb2.Webhook(
                    name="python-example-basic",
                    target_url=basic.url,
                    event_types=EVENT_TYPES,
                    auth=resources_pb2.WebhookAuth(
                        basic=resources_pb2.BasicAuth(
                            username=basic.basic[0], password=basic.basic[1]
                        )
                    ),
                ),
            ),
            metadata=as_admin,
        ).webhook
        created.append(b.id)
        print(f"created {b.id} -> {b.target_url}")

        run_id = uuid.uuid4().hex[:8]
        unary = [event(f"py-{run_id}-{i}", EVENT_TYPES[i % 2], 1000 + i) for i in range(3)]
        answer = ingest.PublishEvents(
            ingest_pb2.PublishEventsRequest(account_id=account, events=unary), metadata=as_ingest
        )
        check(
            [r.event_id for r in answer.results] == [e.event_id for e in unary]
            and not any(r.duplicate for r in answer.results),
            "PublishEvents stored 3 events",
        )
        streamed = [event(f"py-{run_id}-s{i}", "COURSE_COMPLETED", 2000 + i) for i in range(2)]
        requests = (
            ingest_pb2.StreamEventsRequest(account_id=account, events=[e]) for e in streamed
        )
        answers = list(ingest.StreamEvents(requests, metadata=as_ingest))
        check(
            [a.results[0].event_id for a in answers] == [e.event_id for e in streamed],
            "StreamEvents answered each request in order",
        )

        ids = {e.event_id for e in unary + streamed}
        missing = signed_seen.wait_for(ids, args.timeout)
        check(not missing, f"signed listener verified all {len(ids)} events (missing: {missing})")
        missing = basic_seen.wait_for(ids, args.timeout)
        check(not missing, f"basic-auth listener received all {len(ids)} events (missing: {missing})")
        check(signed.rejected == 0 and basic.rejected == 0, "no genuine delivery was refused")
        sample = signed_seen.events[unary[0].event_id]
        check(
            sample["data"] == {"userId": 1000, "loId": "course:1000"}
            and sample["eventName"] == EVENT_TYPES[0],
            "payload carries the published data",
        )

        # The checks are real: forged requests are refused.
        body = b'{"accountId":1,"events":[{"eventId":"forged"}]}'
        forged = {
            "content-type": "application/json",
            "webhook-id": "msg_forged",
            "webhook-timestamp": str(int(time.time())),
            "webhook-signature": "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        }
        check(post(signed.url, body, forged) == 401, "a bad signature is refused with 401")
        forged["authorization"] = "Basic ZXhhbXBsZTp3cm9uZw=="
        check(post(basic.url, body, forged) == 401, "bad basic credentials are refused with 401")
        check("forged" not in signed_seen.events and "forged" not in basic_seen.events,
              "forged events were not accepted")

        deliveries = admin.ListDeliveries(
            admin_pb2.ListDeliveriesRequest(account_id=account, webhook_id=w.id, page_size=100),
            metadata=as_admin,
        ).deliveries
        delivered = [d for d in deliveries if d.state == resources_pb2.DELIVERY_STATE_DELIVERED]
        check(
            {i for d in delivered for i in d.event_ids} >= ids,
            f"ListDeliveries shows the events delivered ({len(delivered)} deliveries)",
        )
    finally:
        for webhook_id in created:
            try:
                admin.DeleteWebhook(
                    admin_pb2.DeleteWebhookRequest(account_id=account, webhook_id=webhook_id),
                    metadata=as_admin,
                )
            except grpc.RpcError as e:
                print(f"warning: cannot delete {webhook_id}: {e.details()}", file=sys.stderr)
        signed.stop()
        basic.stop()
        channel.close()


def main() -> int:
    p = argparse.ArgumentParser(description="webhook-router Python client example")
    p.add_argument("--router", default=os.environ.get("ROUTER", "127.0.0.1:50051"))
    p.add_argument("--admin-token", default=os.environ.get("ADMIN_TOKEN"))
    p.add_argument("--ingest-token", default=os.environ.get("INGEST_TOKEN"))
    p.add_argument("--account", type=int, default=1010)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for deliveries")
    args = p.parse_args()
    if not args.admin_token or not args.ingest_token:
        print("error: set ADMIN_TOKEN and INGEST_TOKEN (or --admin-token/--ingest-token)",
              file=sys.stderr)
        return 2
    try:
        run(args)
    except grpc.RpcError as e:
        print(f"FAILED: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except Exception as e:  # any failed check or unexpected error
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("example passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
