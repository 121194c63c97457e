"""The TokenEndpoint contract (tokenbroker.kernel.http.TokenEndpoint), for every rig in the
registry: the in-memory FakeTokenServer and AiohttpTokenEndpoint against a real local server.

Contract: every HTTP answer comes back unchanged (status, raw body, header names lower-cased);
redirects are never followed; no answer (refused, timed out) and over-large answers (> 1 MiB)
are TransportError, which is retryable; the form goes out urlencoded with the caller's headers.
"""

from __future__ import annotations

import time

import pytest

from tokenbroker.kernel.errors import TransportError
from tokenbroker.kernel.http import HttpResponse

from .endpoint_rigs import CLIENT_TIMEOUT, Answer, EndpointRig, Hang, Post, Refuse, post_once, run

MIB = 1 << 20
JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("status", [200, 201, 204, 400, 401, 403, 404, 429, 500, 502, 503])
def test_every_status_comes_back_unchanged(endpoint_rig: EndpointRig, status: int) -> None:
    body = b"" if status == 204 else b'{"error": "whatever", "n": %d}' % status
    endpoint_rig.script(Answer(status, body, JSON))
    response = post_once(endpoint_rig)
    assert isinstance(response, HttpResponse)
    assert response.status == status
    assert response.body == body
    assert response.headers["content-type"].startswith("application/json")


def test_header_names_are_lower_cased(endpoint_rig: EndpointRig) -> None:
    sent = {"Retry-After": "7", "X-Request-ID": "req-123", "WWW-Authenticate": 'Bearer error="x"'}
    endpoint_rig.script(Answer(429, b"slow down", sent))
    response = post_once(endpoint_rig)
    assert all(name == name.lower() for name in response.headers), response.headers
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-request-id"] == "req-123"
    assert response.headers["www-authenticate"] == 'Bearer error="x"'


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html><body>Bad Gateway</body></html>",
        bytes(range(256)) * 4,  # not UTF-8, not JSON: bytes are bytes
        b'{"access_token": "at", "token_type": "Bearer"}\r\n  ',
    ],
    ids=["empty", "html", "binary", "json-with-trailing-space"],
)
def test_the_raw_body_comes_back_unchanged(endpoint_rig: EndpointRig, body: bytes) -> None:
    endpoint_rig.script(Answer(200, body, {"Content-Type": "application/octet-stream"}))
    assert post_once(endpoint_rig).body == body


def test_a_large_body_under_the_limit_comes_back_whole(endpoint_rig: EndpointRig) -> None:
    body = bytes(n % 251 for n in range(300_000))
    endpoint_rig.script(Answer(200, body))
    response = post_once(endpoint_rig)
    assert len(response.body) == len(body)
    assert response.body == body


def test_a_body_of_exactly_1_mib_comes_back_whole(endpoint_rig: EndpointRig) -> None:
    body = b"a" * MIB
    endpoint_rig.script(Answer(200, body))
    assert post_once(endpoint_rig).body == body


def test_a_body_arriving_in_many_pieces_comes_back_whole(endpoint_rig: EndpointRig) -> None:
    body = b"".join(b"piece-%04d;" % n for n in range(4000))  # 44 kB in 4 kB chunks
    endpoint_rig.script(Answer(200, body, JSON, chunk_size=4096))
    assert post_once(endpoint_rig).body == body


@pytest.mark.parametrize("size", [MIB + 1, 3 * MIB])
def test_a_body_over_1_mib_is_a_transport_error(endpoint_rig: EndpointRig, size: int) -> None:
    endpoint_rig.script(Answer(200, b"x" * size))
    with pytest.raises(TransportError) as caught:
        post_once(endpoint_rig)
    assert caught.value.retryable is True
    assert caught.value.ambiguous is True  # an answer came: the request was processed


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_returned_not_followed(endpoint_rig: EndpointRig, status: int) -> None:
    endpoint_rig.script(
        Answer(status, b"moved", {"Location": "/elsewhere"}),
        Answer(200, b'{"access_token": "followed!"}', JSON),
    )
    response = post_once(endpoint_rig)
    assert response.status == status
    assert response.body == b"moved"
    assert response.headers["location"] == "/elsewhere"
    assert [r.path for r in endpoint_rig.received] == ["/token"]


def test_connection_refused_is_a_retryable_transport_error(endpoint_rig: EndpointRig) -> None:
    endpoint_rig.script(Refuse())
    with pytest.raises(TransportError) as caught:
        post_once(endpoint_rig)
    assert caught.value.retryable is True
    # Nothing was sent, so nothing can have been spent: safe to retry even a rotating token.
    assert caught.value.ambiguous is False
    if endpoint_rig.wire:
        assert endpoint_rig.received == []


def test_a_timeout_is_a_retryable_transport_error(endpoint_rig: EndpointRig) -> None:
    endpoint_rig.script(Hang())
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        post_once(endpoint_rig)
    assert caught.value.retryable is True
    # The request went out: the provider may have processed it (and rotated the token).
    assert caught.value.ambiguous is True
    assert time.monotonic() - started < CLIENT_TIMEOUT + 5  # gave up; did not wait it out


def test_the_endpoint_is_usable_after_a_failure(endpoint_rig: EndpointRig) -> None:
    endpoint_rig.script(Refuse(), Hang(), Answer(200, b"ok"))

    async def scenario(post: Post) -> HttpResponse:
        for _ in range(2):
            with pytest.raises(TransportError):
                await post({"grant_type": "refresh_token"}, headers={})
        return await post({"grant_type": "refresh_token"}, headers={})

    assert run(endpoint_rig, scenario).body == b"ok"


def test_the_form_is_sent_urlencoded(endpoint_rig: EndpointRig) -> None:
    form = {
        "grant_type": "refresh_token",
        "refresh_token": "rt/with+plus&amp=equals=and space",
        "scope": "openid offline_access https://x.example/a?b=c",
        "client_id": "ünïcödé-client",
        "empty": "",
    }
    endpoint_rig.script(Answer(200, b"{}", JSON))
    post_once(endpoint_rig, form)
    (received,) = endpoint_rig.received
    assert received.method == "POST"
    assert received.path == "/token"
    assert received.form == form
    if endpoint_rig.wire:  # the fake takes the form as a mapping: no encoding to observe
        assert received.content_type is not None
        assert received.content_type.split(";")[0].strip() == "application/x-www-form-urlencoded"


def test_custom_headers_arrive(endpoint_rig: EndpointRig) -> None:
    headers = {
        "Authorization": "Basic Y2xpZW50OmNsaWVudC1zZWNyZXQ=",
        "Accept": "application/json",
        "DPoP": "eyJhbGciOiJFUzI1NiJ9.e30.sig",
        "X-Trace-Id": "trace-1",
    }
    endpoint_rig.script(Answer(200, b"{}", JSON))
    post_once(endpoint_rig, headers=headers)
    (received,) = endpoint_rig.received
    for name, value in headers.items():
        assert received.headers[name.lower()] == value


def test_the_url_path_is_kept(endpoint_rig: EndpointRig) -> None:
    endpoint_rig.script(Answer(200, b"{}"))
    post_once(endpoint_rig, path="/oauth2/v4/token")
    assert [r.path for r in endpoint_rig.received] == ["/oauth2/v4/token"]
