"""Firestore errors are translated before they leave the adapter (no client library needed
beyond building a transaction: nothing here reaches a server)."""

from __future__ import annotations

import pytest

from tokenbroker.kernel.errors import StoreUnavailable

firestore = pytest.importorskip("google.cloud.firestore", reason="needs the gcp extra")


def test_a_rollback_the_library_refuses_is_a_retryable_store_error() -> None:
    """Found by the fault suite (Firestore unreachable mid-tick): a transaction whose begin
    never reached the server is rolled back by the client library, which raises its own
    ValueError ("... cannot be rolled back") instead of the network error -- it escaped the
    adapter and the tick crashed as a bug (500, a traceback) instead of halting on an
    unavailable store."""
    from google.auth.credentials import AnonymousCredentials

    from tokenbroker.adapters.gcp.firestore import _translated

    client = firestore.Client(project="p", credentials=AnonymousCredentials())
    with pytest.raises(StoreUnavailable) as caught, _translated("commit outcomes"):
        client.transaction()._rollback()
    assert caught.value.retryable
    assert "commit outcomes" in caught.value.message


def test_a_value_error_of_our_own_is_not_mistaken_for_it() -> None:
    from tokenbroker.adapters.gcp.firestore import _translated

    with pytest.raises(ValueError, match="rolled back"), _translated("read"):
        raise ValueError("this cannot be rolled back")  # not the library's: a bug, as is
