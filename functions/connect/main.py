"""Connect: operators connect accounts (the authorization-code flow) through pages behind
Cloud Run IAM or IAP. A thin adapter over tokenbroker."""

from typing import Any

import functions_framework

from tokenbroker.entrypoints import connect


@functions_framework.http
def connect_http(request: Any) -> tuple[str, int, list[tuple[str, str]]]:
    return connect.handle(request)
