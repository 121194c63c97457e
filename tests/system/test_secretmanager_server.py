"""The local Secret Manager (tests/support/secretmanager_server.py) through the official client.

Every test talks gRPC to a real server with ``google.cloud.secretmanager_v1`` only; each one
proves a documented rule, cited in the server module next to the code that implements it.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from google.api_core import exceptions
from google.cloud import secretmanager_v1

from tests.support.secretmanager_server import (
    MAX_PAYLOAD_BYTES,
    SecretManagerTestServer,
    crc32c,
    make_client,
)
from tests.system.processes import standalone_server

pytestmark = pytest.mark.system

State = secretmanager_v1.SecretVersion.State
PROJECT = "projects/test-project"
AUTOMATIC = {"replication": {"automatic": {}}}


@pytest.fixture(scope="module")
def server() -> Iterator[SecretManagerTestServer]:
    with SecretManagerTestServer() as running:
        yield running


@pytest.fixture(scope="module")
def client(server: SecretManagerTestServer) -> secretmanager_v1.SecretManagerServiceClient:
    return server.client()


def new_secret(client: Any, parent: str = PROJECT, **fields: Any) -> secretmanager_v1.Secret:
    secret_id = f"s-{uuid.uuid4().hex[:12]}"
    return client.create_secret(
        request={"parent": parent, "secret_id": secret_id, "secret": {**AUTOMATIC, **fields}}
    )


def add(client: Any, secret: str, data: bytes, **payload: Any) -> secretmanager_v1.SecretVersion:
    return client.add_secret_version(
        request={"parent": secret, "payload": {"data": data, **payload}}
    )


def number(resource: Any) -> int:
    return int(resource.name.rsplit("/", 1)[1])


# -- secrets ------------------------------------------------------------------------------------


def test_create_get_and_duplicate(client: Any) -> None:
    created = new_secret(client, labels={"env": "prod"})
    assert created.name.startswith(f"{PROJECT}/secrets/s-")
    assert created.create_time is not None
    assert created.etag.startswith('"') and created.etag.endswith('"')  # quoted, like the API's
    assert created.replication.automatic is not None

    fetched = client.get_secret(request={"name": created.name})
    assert fetched == created

    secret_id = created.name.rsplit("/", 1)[1]
    with pytest.raises(exceptions.AlreadyExists):
        client.create_secret(
            request={"parent": PROJECT, "secret_id": secret_id, "secret": AUTOMATIC}
        )


@pytest.mark.parametrize("secret_id", ["has space", "dot.ted", "x" * 256, ""])
def test_secret_id_format(client: Any, secret_id: str) -> None:
    with pytest.raises(exceptions.InvalidArgument):
        client.create_secret(
            request={"parent": PROJECT, "secret_id": secret_id, "secret": AUTOMATIC}
        )


def test_secret_id_at_the_limits(client: Any) -> None:
    secret_id = "A_z-9" + "x" * 250
    created = client.create_secret(
        request={"parent": PROJECT, "secret_id": secret_id, "secret": AUTOMATIC}
    )
    assert created.name == f"{PROJECT}/secrets/{secret_id}"


def test_replication_required_for_global_and_refused_for_regional(client: Any) -> None:
    with pytest.raises(exceptions.InvalidArgument, match=r"Secret\.replication must be provided"):
        client.create_secret(request={"parent": PROJECT, "secret_id": "no-replication"})
    regional = f"{PROJECT}/locations/us-central1"
    with pytest.raises(exceptions.InvalidArgument, match="should not be provided"):
        new_secret(client, parent=regional)
    created = client.create_secret(
        request={"parent": regional, "secret_id": "regional", "secret": {}}
    )
    assert created.name == f"{regional}/secrets/regional"
    # A regional secret is not listed under the project, nor a global one under the location.
    names = [s.name for s in client.list_secrets(request={"parent": regional})]
    assert names == [created.name]
    assert created.name not in [s.name for s in client.list_secrets(request={"parent": PROJECT})]


@pytest.mark.parametrize(
    "name",
    [
        "projects/p/secret/x",
        "project/p/secrets/x",
        "projects/p/secrets/x/",
        "projects/p/secrets/bad.id",
        "projects//secrets/x",
    ],
)
def test_malformed_secret_names(client: Any, name: str) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="not in a valid format"):
        client.get_secret(request={"name": name})


@pytest.mark.parametrize(
    "name", ["projects/p/secrets/x", "projects/p/secrets/x/versions/", "projects/p/versions/1"]
)
def test_malformed_version_names(client: Any, name: str) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="not in a valid format"):
        client.access_secret_version(request={"name": name})


def test_update_secret_honours_mask_and_etag(client: Any) -> None:
    secret = new_secret(client, labels={"env": "dev"}, annotations={"note": "one"})

    updated = client.update_secret(
        request={
            "secret": {
                "name": secret.name,
                "etag": secret.etag,
                "labels": {"env": "prod", "team": "a"},
                "annotations": {"ignored": "not in the mask"},
            },
            "update_mask": {"paths": ["labels"]},
        }
    )
    assert dict(updated.labels) == {"env": "prod", "team": "a"}
    assert dict(updated.annotations) == {"note": "one"}  # not in the mask: untouched
    assert updated.etag != secret.etag  # the secret etag changes on update
    assert client.get_secret(request={"name": secret.name}) == updated

    # The etag read before the first update is stale now: FAILED_PRECONDITION (docs/etags).
    with pytest.raises(exceptions.FailedPrecondition, match="etag"):
        client.update_secret(
            request={
                "secret": {"name": secret.name, "etag": secret.etag, "annotations": {"a": "b"}},
                "update_mask": {"paths": ["annotations"]},
            }
        )
    assert client.get_secret(request={"name": secret.name}) == updated

    # No etag: no check. Even an update to the same value changes the etag.
    again = client.update_secret(
        request={
            "secret": {"name": secret.name, "labels": dict(updated.labels)},
            "update_mask": {"paths": ["labels"]},
        }
    )
    assert dict(again.labels) == dict(updated.labels)
    assert again.etag != updated.etag


def test_update_secret_rejects_bad_masks(client: Any) -> None:
    secret = new_secret(client)
    for paths in ([], ["replication"], ["name"], ["create_time"], ["nonsense"]):
        with pytest.raises(exceptions.InvalidArgument):
            client.update_secret(
                request={"secret": {"name": secret.name}, "update_mask": {"paths": paths}}
            )
    with pytest.raises(exceptions.InvalidArgument, match="label"):
        client.update_secret(
            request={
                "secret": {"name": secret.name, "labels": {"Upper": "x"}},
                "update_mask": {"paths": ["labels"]},
            }
        )
    with pytest.raises(exceptions.NotFound):
        client.update_secret(
            request={
                "secret": {"name": f"{PROJECT}/secrets/missing", "labels": {}},
                "update_mask": {"paths": ["labels"]},
            }
        )


def test_delete_secret_with_etag(client: Any) -> None:
    secret = new_secret(client)
    add(client, secret.name, b"v1")
    with pytest.raises(exceptions.FailedPrecondition):
        client.delete_secret(request={"name": secret.name, "etag": '"stale"'})
    client.delete_secret(request={"name": secret.name, "etag": secret.etag})
    with pytest.raises(exceptions.NotFound):
        client.get_secret(request={"name": secret.name})
    with pytest.raises(exceptions.NotFound):
        client.access_secret_version(request={"name": f"{secret.name}/versions/1"})
    with pytest.raises(exceptions.NotFound):
        client.delete_secret(request={"name": secret.name})


def test_list_secrets_filter_paging_and_project_isolation(client: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    project = f"projects/iso-{tag}"
    ids = [f"{tag}-a", f"{tag}-b", f"other-{tag}"]
    for secret_id, env in zip(ids, ["prod", "dev", "prod"], strict=True):
        client.create_secret(
            request={
                "parent": project,
                "secret_id": secret_id,
                "secret": {**AUTOMATIC, "labels": {"env": env}},
            }
        )
    client.create_secret(
        request={"parent": f"projects/else-{tag}", "secret_id": ids[0], "secret": AUTOMATIC}
    )

    def listed(**request: Any) -> list[str]:
        pager = client.list_secrets(request={"parent": project, **request})
        return [s.name.rsplit("/", 1)[1] for s in pager]

    assert listed() == list(reversed(ids))  # newest first, only this project
    assert listed(filter="labels.env=prod") == [ids[2], ids[0]]
    assert listed(filter=f"name:{tag}-") == [ids[1], ids[0]]
    assert listed(filter=f"name:{tag}-* AND labels.env=dev") == [ids[1]]
    assert listed(filter="labels.env=dev OR labels.env=prod") == list(reversed(ids))
    assert listed(filter="NOT labels.env=prod") == [ids[1]]
    assert listed(filter="labels.env:*") == list(reversed(ids))
    assert listed(filter="labels.missing:*") == []

    first = client.list_secrets(request={"parent": project, "page_size": 2})
    page = next(iter(first.pages))
    assert len(page.secrets) == 2 and page.next_page_token and page.total_size == 3
    with pytest.raises(exceptions.InvalidArgument):
        client.list_secrets(request={"parent": project, "filter": "bogus=1"})


# -- versions -----------------------------------------------------------------------------------


def test_versions_count_from_one_and_are_never_reused(client: Any) -> None:
    secret = new_secret(client)
    versions = [add(client, secret.name, f"value {i}".encode()) for i in range(3)]
    assert [number(v) for v in versions] == [1, 2, 3]
    assert all(v.state == State.ENABLED and v.create_time is not None for v in versions)
    assert len({v.etag for v in versions}) == 3

    client.destroy_secret_version(request={"name": versions[2].name})
    assert number(add(client, secret.name, b"fourth")) == 4

    with pytest.raises(exceptions.NotFound):
        client.get_secret_version(request={"name": f"{secret.name}/versions/9"})


def test_access_by_number_and_latest(client: Any) -> None:
    secret = new_secret(client)
    for i in range(1, 4):
        add(client, secret.name, f"value {i}".encode())
    for i in range(1, 4):
        response = client.access_secret_version(request={"name": f"{secret.name}/versions/{i}"})
        assert response.payload.data == f"value {i}".encode()
        assert response.name == f"{secret.name}/versions/{i}"

    latest = client.access_secret_version(request={"name": f"{secret.name}/versions/latest"})
    assert latest.payload.data == b"value 3"
    assert latest.name == f"{secret.name}/versions/3"  # the resolved version, not the alias
    meta = client.get_secret_version(request={"name": f"{secret.name}/versions/latest"})
    assert meta.name == f"{secret.name}/versions/3"


def test_latest_without_versions_is_not_found(client: Any) -> None:
    secret = new_secret(client)
    with pytest.raises(exceptions.NotFound, match="has no versions"):
        client.access_secret_version(request={"name": f"{secret.name}/versions/latest"})


def test_crc32c_is_castagnoli() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4: 32 bytes of zeroes
    assert crc32c(b"a\n") == 163439259  # the sample in docs/data-integrity ("YQo=")
    try:
        import google_crc32c
    except ImportError:
        return
    for data in (b"", b"a\n", bytes(range(256)) * 5):
        assert crc32c(data) == google_crc32c.value(data)


def test_crc32c_returned_on_access_and_verified_on_add(client: Any) -> None:
    secret = new_secret(client)
    given = add(client, secret.name, b"with checksum", data_crc32c=crc32c(b"with checksum"))
    assert given.client_specified_payload_checksum is True
    generated = add(client, secret.name, b"without checksum")
    assert generated.client_specified_payload_checksum is False

    for version, data in ((given, b"with checksum"), (generated, b"without checksum")):
        payload = client.access_secret_version(request={"name": version.name}).payload
        assert payload.data == data
        assert "data_crc32c" in payload
        assert payload.data_crc32c == crc32c(data)

    with pytest.raises(exceptions.InvalidArgument, match=r"(?i)checksum"):
        add(client, secret.name, b"corrupted", data_crc32c=crc32c(b"corrupted") ^ 1)
    with pytest.raises(exceptions.InvalidArgument):
        add(client, secret.name, b"zero is a checksum too", data_crc32c=0)
    # Nothing was stored by the refused writes.
    versions = client.list_secret_versions(request={"parent": secret.name})
    assert sorted(number(v) for v in versions) == [1, 2]


def test_payload_limits(client: Any) -> None:
    secret = new_secret(client)
    with pytest.raises(exceptions.InvalidArgument, match="payload"):
        add(client, secret.name, b"")
    with pytest.raises(exceptions.InvalidArgument):
        client.add_secret_version(request={"parent": secret.name})
    with pytest.raises(exceptions.InvalidArgument):
        add(client, secret.name, b"x" * (MAX_PAYLOAD_BYTES + 1))
    biggest = add(client, secret.name, b"x" * MAX_PAYLOAD_BYTES)
    payload = client.access_secret_version(request={"name": biggest.name}).payload
    assert len(payload.data) == MAX_PAYLOAD_BYTES


def test_disable_blocks_access_and_enable_restores_it(client: Any) -> None:
    secret = new_secret(client)
    version = add(client, secret.name, b"sensitive")

    disabled = client.disable_secret_version(request={"name": version.name})
    assert disabled.state == State.DISABLED
    with pytest.raises(exceptions.FailedPrecondition, match="DISABLED state"):
        client.access_secret_version(request={"name": version.name})
    # Metadata stays readable.
    assert client.get_secret_version(request={"name": version.name}).state == State.DISABLED

    enabled = client.enable_secret_version(request={"name": version.name})
    assert enabled.state == State.ENABLED
    payload = client.access_secret_version(request={"name": version.name}).payload
    assert payload.data == b"sensitive"


def test_destroy_is_final_and_drops_the_payload(
    server: SecretManagerTestServer, client: Any
) -> None:
    secret = new_secret(client)
    version = add(client, secret.name, b"doomed")

    destroyed = client.destroy_secret_version(request={"name": version.name})
    assert destroyed.state == State.DESTROYED
    assert "destroy_time" in destroyed and destroyed.destroy_time >= destroyed.create_time
    with pytest.raises(exceptions.FailedPrecondition, match="DESTROYED state"):
        client.access_secret_version(request={"name": version.name})
    for leave in (client.enable_secret_version, client.disable_secret_version):
        with pytest.raises(exceptions.FailedPrecondition, match="DESTROYED"):
            leave(request={"name": version.name})
    with pytest.raises(exceptions.FailedPrecondition):
        client.destroy_secret_version(request={"name": version.name})
    meta = client.get_secret_version(request={"name": version.name})
    assert meta.state == State.DESTROYED and meta.destroy_time == destroyed.destroy_time
    # The data is gone from the store, not just hidden.
    stored = server.store._secrets[secret.name]  # white-box: the bytes are gone
    assert stored.versions[number(version)].data is None


def test_latest_never_skips_a_disabled_or_destroyed_version(client: Any) -> None:
    secret = new_secret(client)
    add(client, secret.name, b"old")
    newest = add(client, secret.name, b"new")
    client.disable_secret_version(request={"name": newest.name})
    with pytest.raises(exceptions.FailedPrecondition, match=r"versions/2\] is in DISABLED"):
        client.access_secret_version(request={"name": f"{secret.name}/versions/latest"})
    client.destroy_secret_version(request={"name": newest.name})
    with pytest.raises(exceptions.FailedPrecondition, match=r"versions/2\] is in DESTROYED"):
        client.access_secret_version(request={"name": f"{secret.name}/versions/latest"})
    meta = client.get_secret_version(request={"name": f"{secret.name}/versions/latest"})
    assert number(meta) == 2 and meta.state == State.DESTROYED


def test_version_etags(client: Any) -> None:
    secret = new_secret(client)
    version = add(client, secret.name, b"v")

    # Even a no-op enable changes the version etag (docs/etags), so a disable with the etag read
    # before it fails.
    enabled = client.enable_secret_version(request={"name": version.name, "etag": version.etag})
    assert enabled.state == State.ENABLED and enabled.etag != version.etag
    with pytest.raises(exceptions.FailedPrecondition, match="etag"):
        client.disable_secret_version(request={"name": version.name, "etag": version.etag})
    assert client.get_secret_version(request={"name": version.name}).state == State.ENABLED

    disabled = client.disable_secret_version(request={"name": version.name, "etag": enabled.etag})
    assert disabled.state == State.DISABLED and disabled.etag != enabled.etag
    with pytest.raises(exceptions.FailedPrecondition):
        client.destroy_secret_version(request={"name": version.name, "etag": enabled.etag})
    client.destroy_secret_version(request={"name": version.name, "etag": disabled.etag})

    # Version changes leave the secret's etag alone.
    assert client.get_secret(request={"name": secret.name}).etag == secret.etag


def test_state_changes_take_a_version_number(client: Any) -> None:
    secret = new_secret(client)
    add(client, secret.name, b"v")
    with pytest.raises(exceptions.InvalidArgument):
        client.disable_secret_version(request={"name": f"{secret.name}/versions/latest"})


def test_list_versions_pages_newest_first(client: Any) -> None:
    secret = new_secret(client)
    for i in range(7):
        add(client, secret.name, f"{i}".encode())

    pager = client.list_secret_versions(request={"parent": secret.name, "page_size": 3})
    pages = [[number(v) for v in page.versions] for page in pager.pages]
    assert pages == [[7, 6, 5], [4, 3, 2], [1]]

    first = client.list_secret_versions(request={"parent": secret.name, "page_size": 3})
    page = next(iter(first.pages))
    assert page.total_size == 7 and page.next_page_token
    # A version added while paging does not shift the next page (the token is a cursor).
    add(client, secret.name, b"8")
    rest = client.list_secret_versions(
        request={"parent": secret.name, "page_size": 3, "page_token": page.next_page_token}
    )
    assert [number(v) for v in next(iter(rest.pages)).versions] == [4, 3, 2]

    with pytest.raises(exceptions.InvalidArgument):
        client.list_secret_versions(request={"parent": secret.name, "page_token": "garbage"})
    other = new_secret(client)
    with pytest.raises(exceptions.InvalidArgument):  # a token only fits its own listing
        client.list_secret_versions(
            request={"parent": other.name, "page_token": page.next_page_token}
        )


def test_list_versions_filter_by_state(client: Any) -> None:
    secret = new_secret(client)
    names = [add(client, secret.name, f"{i}".encode()).name for i in range(1, 6)]
    client.disable_secret_version(request={"name": names[1]})
    client.disable_secret_version(request={"name": names[3]})
    client.destroy_secret_version(request={"name": names[4]})

    def listed(filter_: str, **request: Any) -> list[int]:
        pager = client.list_secret_versions(
            request={"parent": secret.name, "filter": filter_, **request}
        )
        return [number(v) for v in pager]

    assert listed("state:ENABLED") == [3, 1]
    assert listed("state=DISABLED") == [4, 2]
    assert listed("state:destroyed") == [5]
    assert listed("NOT state:DESTROYED") == [4, 3, 2, 1]
    assert listed("state:ENABLED OR state:DISABLED") == [4, 3, 2, 1]
    assert listed("-state:ENABLED") == [5, 4, 2]
    assert listed("state:ENABLED", page_size=1) == [3, 1]  # filters and pages together
    assert listed("create_time>2000-01-01T00:00:00Z AND state:ENABLED") == [3, 1]
    assert listed("create_time<2000-01-01T00:00:00Z") == []
    pager = client.list_secret_versions(request={"parent": secret.name, "filter": "state:ENABLED"})
    page = next(iter(pager.pages))
    assert page.total_size == 0  # "0 when the filter field is set"
    for bad in ("colour:red", "state:", "(state:ENABLED", "state>ENABLED"):
        with pytest.raises(exceptions.InvalidArgument):
            listed(bad)


def test_not_found(client: Any) -> None:
    missing = f"{PROJECT}/secrets/never-created-{uuid.uuid4().hex[:6]}"
    secret = new_secret(client)
    add(client, secret.name, b"one")
    calls = [
        (client.get_secret, {"name": missing}),
        (client.delete_secret, {"name": missing}),
        (client.add_secret_version, {"parent": missing, "payload": {"data": b"x"}}),
        (client.list_secret_versions, {"parent": missing}),
        (client.access_secret_version, {"name": f"{missing}/versions/latest"}),
        (client.access_secret_version, {"name": f"{secret.name}/versions/2"}),
        (client.get_secret_version, {"name": f"{secret.name}/versions/2"}),
        (client.enable_secret_version, {"name": f"{secret.name}/versions/2"}),
        (client.disable_secret_version, {"name": f"{secret.name}/versions/2"}),
        (client.destroy_secret_version, {"name": f"{secret.name}/versions/2"}),
        (client.access_secret_version, {"name": f"{secret.name}/versions/no-such-alias"}),
    ]
    for method, request in calls:
        with pytest.raises(exceptions.NotFound):
            method(request=request)


def test_version_aliases(client: Any) -> None:
    secret = new_secret(client)
    add(client, secret.name, b"first")
    add(client, secret.name, b"second")
    client.update_secret(
        request={
            "secret": {"name": secret.name, "version_aliases": {"current": 1}},
            "update_mask": {"paths": ["version_aliases"]},
        }
    )
    payload = client.access_secret_version(request={"name": f"{secret.name}/versions/current"})
    assert payload.payload.data == b"first" and payload.name == f"{secret.name}/versions/1"
    for aliases in ({"latest": 1}, {"1bad": 1}, {"ghost": 9}):
        with pytest.raises(exceptions.InvalidArgument):
            client.update_secret(
                request={
                    "secret": {"name": secret.name, "version_aliases": aliases},
                    "update_mask": {"paths": ["version_aliases"]},
                }
            )


def test_delayed_destruction(client: Any) -> None:
    secret = new_secret(client, version_destroy_ttl={"seconds": 3600})
    version = add(client, secret.name, b"keep me a while")
    pending = client.destroy_secret_version(request={"name": version.name})
    assert pending.state == State.DISABLED and "scheduled_destroy_time" in pending
    restored = client.enable_secret_version(request={"name": version.name})
    assert restored.state == State.ENABLED and "scheduled_destroy_time" not in restored
    payload = client.access_secret_version(request={"name": version.name}).payload
    assert payload.data == b"keep me a while"


def test_concurrent_adds_get_unique_increasing_versions(client: Any) -> None:
    secret = new_secret(client)
    threads, per_thread = 8, 10
    seen: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def writer(index: int) -> None:
        try:
            start.wait(timeout=5)
            seen[index] = [
                number(add(client, secret.name, f"{index}-{i}".encode())) for i in range(per_thread)
            ]
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert not errors
    numbers = list(itertools.chain.from_iterable(seen.values()))
    assert sorted(numbers) == list(range(1, threads * per_thread + 1))
    for mine in seen.values():
        assert mine == sorted(mine)  # each writer sees its own versions increase
    # Every version holds what the writer that got its number sent.
    for index, mine in seen.items():
        for i, version in enumerate(mine):
            name = f"{secret.name}/versions/{version}"
            data = client.access_secret_version(request={"name": name}).payload.data
            assert data == f"{index}-{i}".encode()


def test_calls_are_counted_per_method(server: SecretManagerTestServer, client: Any) -> None:
    secret = new_secret(client)
    server.reset_calls()
    assert server.calls == Counter()
    version = add(client, secret.name, b"v")
    client.get_secret(request={"name": secret.name})
    client.access_secret_version(request={"name": version.name})
    client.access_secret_version(request={"name": f"{secret.name}/versions/latest"})
    with pytest.raises(exceptions.NotFound):  # failed calls count too
        client.access_secret_version(request={"name": f"{secret.name}/versions/5"})
    assert server.calls == Counter(
        {"AddSecretVersion": 1, "GetSecret": 1, "AccessSecretVersion": 3}
    )
    snapshot = server.calls
    snapshot["GetSecret"] += 100  # a copy: the server's count is unaffected
    assert server.calls["GetSecret"] == 1
    server.reset_calls()
    assert sum(server.calls.values()) == 0


def test_project_numbers_rewrite_names() -> None:
    with SecretManagerTestServer(project_numbers={"my-project": "123456"}) as numbered:
        client = numbered.client()
        created = client.create_secret(
            request={"parent": "projects/my-project", "secret_id": "s", "secret": AUTOMATIC}
        )
        assert created.name == "projects/123456/secrets/s"
        by_id = client.get_secret(request={"name": "projects/my-project/secrets/s"})
        by_number = client.get_secret(request={"name": "projects/123456/secrets/s"})
        assert by_id == by_number == created


def test_standalone_process() -> None:
    with standalone_server("tests.support.secretmanager_server") as address:
        client = make_client(address)
        try:
            created = client.create_secret(
                request={"parent": PROJECT, "secret_id": "standalone", "secret": AUTOMATIC}
            )
            add(client, created.name, b"across processes")
            response = client.access_secret_version(
                request={"name": f"{created.name}/versions/latest"}
            )
            assert response.payload.data == b"across processes"
        finally:
            client.transport.close()
