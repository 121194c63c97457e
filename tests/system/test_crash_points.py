"""SIGKILL at each step boundary of a refresh, against oidc-provider (which rotates refresh
tokens and revokes the grant when a used one comes back), on the embedded backend.

The refresher is the real ``tokenbroker`` command, killed by its own failpoint
(``TOKENBROKER_FAILPOINTS``, ``kernel/failpoints.py``) at the first pass of each boundary; then
a clean refresher takes over. Nothing may be lost: no ``invalid_grant``, no connection needing
re-authorisation, every committed version announced. A kill with a request on the wire leaves
connections *at risk* (their access tokens still served), never presented again blindly.
(The fault-suite harness runs this at scale, with figures; this is the protocol's own proof.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import save_output
from tests.support.oidc import RT_BASIC_ID, RT_BASIC_SECRET, OidcServer
from tests.system.helpers import add_refresh_connection, embedded_runtime, outbox, tick
from tests.system.processes import BIN
from tokenbroker.kernel.model import ClientAuthMethod, ConnectionStatus, EventType

pytestmark = pytest.mark.system

IDS = ["c0", "c1", "c2"]
LEASE_TTL = 20  # seconds: the shortest the settings allow
#: Where a kill leaves a request's outcome unknown (the answer is not durable yet).
ON_THE_WIRE = {"intent.durable", "request.sent", "answer.received"}
POINTS = [
    "lease.claimed",
    "intent.durable",
    "request.sent",
    "answer.received",
    "secret.written",
    "state.committed",
    "events.published",
]


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_each_step_boundary_loses_no_connection(
    tmp_path: Path, oidc: OidcServer, point: str
) -> None:
    state_dir = tmp_path / "state"
    runtime = embedded_runtime(state_dir)
    try:
        for cid in IDS:
            add_refresh_connection(
                runtime, oidc, cid, client_id=RT_BASIC_ID, client_secret=RT_BASIC_SECRET,
                auth_method=ClientAuthMethod.BASIC,
            )  # fmt: skip
        assert tick(runtime).refreshed == len(IDS)  # each serves a fresh access token now
    finally:
        runtime.close()
    oidc.reset_stats()

    env = {
        **os.environ,
        "TOKENBROKER_STATE_DIR": str(state_dir),
        "TOKENBROKER_FAILPOINTS": point,
        "TOKENBROKER_LEASE_TTL_SECONDS": str(LEASE_TTL),
        "TOKENBROKER_HTTP_TIMEOUT": "5",
    }
    env.pop("TOKENBROKER_ENCRYPTION_KEY", None)
    killed = subprocess.run(
        [str(BIN / "tokenbroker"), "refresh", "--all"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    save_output(f"crash-{point}", killed.stdout, killed.stderr)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    # The dead holder's leases (those of the connections it had not committed yet) expire by
    # the host's boot clock; until then the stores already hold whatever it made durable.
    time.sleep(LEASE_TTL + 1)
    runtime = embedded_runtime(state_dir, lease_ttl_seconds=LEASE_TTL)
    try:
        after = tick(runtime, connection_ids=IDS)
        tick(runtime)  # and a plain tick: relays whatever is still parked
        records = {r.connection.id: r.state for r in runtime.state.list()}
        stats = oidc.stats()
        assert stats["invalid_grant"] == 0, (point, stats, after.to_json())
        for cid, state in records.items():
            assert state.status is ConnectionStatus.ACTIVE, (point, cid, state)
            stored = runtime.secrets.get(cid)
            assert stored.version == state.current_version, (point, cid)
            if state.at_risk:
                # Only a kill with a request (possibly) on the wire leaves that, and the
                # connection still serves its unexpired access token.
                assert point in ON_THE_WIRE or point == "secret.written", (point, cid)
                assert state.intent is not None and stored.version == 2
                assert stored.credential.expires_at is not None
            else:
                # Refreshed (the tokens live 5 minutes: the plain tick may refresh again).
                assert stored.version >= 3, (point, cid, state)
        if point not in ON_THE_WIRE | {"secret.written"}:
            assert not any(s.at_risk for s in records.values()), point
        if point == "secret.written":
            assert any(not s.at_risk for s in records.values())  # the staged one, settled
        # Every committed version was announced (no crash point loses an event).
        announced = {
            (e.connection_id, e.version) for e in outbox(runtime) if e.type is EventType.ROTATED
        }
        for cid, s in records.items():
            assert s.current_version is not None
            for version in range(2, s.current_version + 1):
                assert (cid, version) in announced, (point, cid, version)
        # And the tokens those hold are alive: one more forced refresh of them works.
        alive = [cid for cid, s in records.items() if not s.at_risk]
        if alive:
            assert tick(runtime, connection_ids=alive).refreshed == len(alive)
        assert oidc.stats()["invalid_grant"] == 0
    finally:
        runtime.close()
