"""OAuth 2.0 protocol code, organised by RFC, independent of storage and scheduling.

As in google-auth's ``oauth2/_client.py``, the protocol functions take the transport (a
:class:`~tokenbroker.kernel.http.TokenEndpoint`) as their first argument, so every transport
and every test double plugs in the same way.
"""
