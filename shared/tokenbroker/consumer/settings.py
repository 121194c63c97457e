"""The consumer client's configuration from the environment: the one module of the consumer
that reads ``os.environ``.

Resolved one way, as everywhere in tokenbroker (docs/client.md, *The caller's ID token*):
explicit argument, then environment variable, then default; once, when a client is built
(cold start), never when a module is imported. The variable names are the constants below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tokenbroker.kernel.secret import Secret

ENV_ID_TOKEN = "TOKENBROKER_ID_TOKEN"  # noqa: S105 - a variable name
"""A Google ID token to present to the broker (local runs; it expires after one hour)."""
ENV_ID_TOKEN_FILE = "TOKENBROKER_ID_TOKEN_FILE"  # noqa: S105 - a variable name
"""A file holding the ID token, re-read on every broker request (local runs)."""


@dataclass(frozen=True)
class ClientSettings:
    """Where the caller's ID token comes from. Neither field set (the default) means
    google-auth: a service-account key or the metadata server.

    ``id_token`` wins over ``id_token_file`` when both are set.
    """

    id_token: Secret | None = None
    id_token_file: Path | None = None

    @classmethod
    def resolve(
        cls,
        *,
        id_token: str | Secret | None = None,
        id_token_file: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientSettings:
        """Explicit arguments if any is given; else ``TOKENBROKER_ID_TOKEN``, then
        ``TOKENBROKER_ID_TOKEN_FILE`` (empty values count as unset); else the default.

        The two sources are resolved together, not field by field: a token file given in
        code is not overridden by a token left in the environment.
        """
        if id_token is None and id_token_file is None:
            env = os.environ if environ is None else environ
            id_token = env.get(ENV_ID_TOKEN) or None
            id_token_file = None if id_token else env.get(ENV_ID_TOKEN_FILE) or None
        return cls(
            id_token=Secret(id_token) if isinstance(id_token, str) else id_token,
            id_token_file=Path(id_token_file) if id_token_file is not None else None,
        )
