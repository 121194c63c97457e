"""End-to-end demo on the embedded default, against a real OAuth server (oidc-provider).

1. Starts oidc-provider with refresh-token rotation and 20-second access tokens.
2. Consents once as a user (authorization code + PKCE) to get a refresh token.
3. Registers the connection with the real ``tokenbroker`` CLI (refresh token on stdin).
4. Runs ``tokenbroker serve`` (the refresh loop + HTTP endpoints) and watches it refresh the
   credential ahead of expiry, again and again.
5. Shows the status table and the events, and checks: every rotation happened before the
   previous access token expired, and the server never saw a re-used refresh token.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.oidc import RT_BASIC_ID, RT_BASIC_SECRET, OidcServer, free_port

BIN = Path(sys.executable).parent
TTL = 20


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=35, help="how long to watch")
    parser.add_argument(
        "--backend",
        choices=["embedded", "gcp"],
        default="embedded",
        help="gcp: Firestore and Pub/Sub emulators plus the Secret Manager test server",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tokenbroker-demo-"))
    env = {
        **os.environ,
        "TOKENBROKER_STATE_DIR": str(work / "state"),
        "TOKENBROKER_MIN_LEAD_SECONDS": "5",  # short-lived demo tokens: refresh near half-life
        "TOKENBROKER_LOG_LEVEL": "warning",
        "DEMO_CLIENT_SECRET": RT_BASIC_SECRET,
    }
    env.pop("TOKENBROKER_ENCRYPTION_KEY", None)
    cloud = GcpLocal() if args.backend == "gcp" else None
    if cloud is not None:
        say("Starting the Firestore and Pub/Sub emulators and the Secret Manager test server")
        env.update(cloud.start())
        print(f"project {cloud.project}: events go to {cloud.topic}")

    def cli(*argv: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [str(BIN / "tokenbroker"), *argv],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if result.returncode != 0:
            print(result.stdout, result.stderr, file=sys.stderr)
            raise SystemExit(f"tokenbroker {' '.join(argv)} failed ({result.returncode})")
        return result.stdout

    say(f"Starting oidc-provider (rotating refresh tokens, {TTL}s access tokens)")
    server = OidcServer().start(work / "oidc", access_token_ttl=TTL)
    try:
        print(f"issuer: {server.issuer}")
        say("Consenting once as a user (authorization code + PKCE) to get a refresh token")
        tokens = server.obtain_refresh_token(RT_BASIC_ID, RT_BASIC_SECRET)
        print("got a refresh token (it goes to tokenbroker on stdin and is never printed)")

        say("tokenbroker add crm ...  (registers, refreshes once, stores it encrypted)")
        print(
            cli(
                "add",
                "crm",
                "--grant",
                "refresh_token",
                "--client-id",
                RT_BASIC_ID,
                "--client-secret-env",
                "DEMO_CLIENT_SECRET",
                "--refresh-token-file",
                "-",
                "--token-url",
                server.token_url,
                "--scope",
                "openid offline_access api:read",
                stdin=tokens["refresh_token"],
            )
        )

        port = free_port()
        say(f"tokenbroker serve --interval 1  (watching for {args.seconds:.0f}s)")
        serve = subprocess.Popen(
            [
                str(BIN / "tokenbroker"),
                "serve",
                "--port",
                str(port),
                "--interval",
                "1",
                "--duration",
                str(args.seconds),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        last_version = None
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline and serve.poll() is None:
            state = json.loads(cli("--json", "show", "crm"))["state"]
            if state["current_version"] != last_version:
                print(
                    f"{datetime.now():%H:%M:%S}  version {state['current_version']}  "
                    f"expires {state['expires_at']}  next refresh {state['next_refresh_at']}",
                    flush=True,
                )
                last_version = state["current_version"]
            time.sleep(0.5)
        serve.wait(30)

        say("tokenbroker status")
        print(cli("status"))
        if cloud is None:
            say("tokenbroker events")
            print(cli("events"))
            events = json.loads(cli("--json", "events"))
        else:
            say(f"Events received by a Pub/Sub subscriber on {cloud.subscription}")
            events = cloud.pull()
            for e in events:
                print(f"{e['occurred_at']}  {e['type']:<20} {e['connection_id']}  v{e['version']}")
            say("Secret Manager versions of the connection's secret")
            for version, state in cloud.versions("crm"):
                print(f"version {version}: {state}")

        rotations = [e for e in events if e["type"] == "credential.rotated"]
        early = all(
            later["occurred_at"] < earlier["expires_at"]
            for earlier, later in itertools.pairwise(rotations)
        )
        stats = server.stats()
        say("Result")
        ok = len(rotations) >= 3 and early and stats["invalid_grant"] == 0
        print(
            f"rotations: {len(rotations)}; each before the previous token expired: {early}; "
            f"refresh tokens re-used (invalid_grant at the server): {stats['invalid_grant']}"
        )
        print(
            "OK: refreshed ahead of expiry, events emitted, no token printed." if ok else "FAILED"
        )
        return 0 if ok else 1
    finally:
        server.stop()
        if cloud is not None:
            cloud.stop()


class GcpLocal:
    """The GCP backends, locally: official emulators and our Secret Manager test server."""

    def __init__(self) -> None:
        import uuid

        self.project = f"demo-{uuid.uuid4().hex[:8]}"
        self.topic = f"projects/{self.project}/topics/tokenbroker-events"
        self.subscription = f"projects/{self.project}/subscriptions/demo-watcher"
        self.server: object = None

    def start(self) -> dict[str, str]:
        from google.cloud import pubsub_v1
        from tests.support.emulators import emulator
        from tests.support.secretmanager_server import SecretManagerTestServer

        firestore, pubsub = emulator("firestore"), emulator("pubsub")
        self.server = SecretManagerTestServer().start()
        pubsub_v1.PublisherClient().create_topic(name=self.topic)
        pubsub_v1.SubscriberClient().create_subscription(
            request={
                "name": self.subscription,
                "topic": self.topic,
                "enable_message_ordering": True,
            }
        )
        return {
            "TOKENBROKER_BACKEND": "gcp",
            "TOKENBROKER_GCP_PROJECT": self.project,
            "TOKENBROKER_SECRET_MANAGER_ENDPOINT": self.server.address,  # type: ignore[attr-defined]
            "TOKENBROKER_METRICS": "off",
            "FIRESTORE_EMULATOR_HOST": firestore.host,
            "PUBSUB_EMULATOR_HOST": pubsub.host,
        }

    def pull(self) -> list[dict[str, object]]:
        from google.cloud import pubsub_v1

        subscriber = pubsub_v1.SubscriberClient()
        events: list[dict[str, object]] = []
        while True:
            response = subscriber.pull(
                request={"subscription": self.subscription, "max_messages": 100}, timeout=3
            )
            if not response.received_messages:
                return events
            events += [json.loads(m.message.data) for m in response.received_messages]
            subscriber.acknowledge(
                request={
                    "subscription": self.subscription,
                    "ack_ids": [m.ack_id for m in response.received_messages],
                }
            )

    def versions(self, connection_id: str) -> list[tuple[int, str]]:
        client = self.server.client()  # type: ignore[attr-defined]
        parent = f"projects/{self.project}/secrets/tokenbroker-{connection_id}"
        listed = client.list_secret_versions(request={"parent": parent})
        return sorted((int(v.name.rsplit("/", 1)[1]), v.state.name) for v in listed)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    raise SystemExit(main())
