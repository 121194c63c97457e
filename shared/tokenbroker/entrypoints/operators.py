"""Who the operator of the connect function is, taken from the platform, and whether they may.

Two modes (``TOKENBROKER_OPERATOR_IDENTITY``):

* ``platform`` -- Cloud Run IAM. The function is not public: only principals with
  ``roles/run.invoker`` on it reach it (the Terraform binds the ``operators`` variable).
  Operators open it through ``gcloud run services proxy NAME`` (a proxy on localhost that adds
  their identity token, https://cloud.google.com/sdk/gcloud/reference/run/services/proxy).
  Cloud Run verifies the token before the request arrives and passes it on with its signature
  replaced by ``SIGNATURE_REMOVED_BY_GOOGLE``
  (https://cloud.google.com/run/docs/authenticating/service-to-service#acquire-token); the
  operator is that token's ``email``, read exactly as the issuer's ``platform`` mode reads
  callers (:class:`~tokenbroker.issue.idtoken.IdTokenVerifier`: issuer, audience, times,
  ``email_verified``). A user's token from the gcloud CLI carries gcloud's own OAuth client as
  ``aud``, not the service URL (https://cloud.google.com/run/docs/authenticating/developers),
  so ``TOKENBROKER_CONNECT_AUDIENCE`` lists it next to the function's URLs.
* ``iap`` -- behind Identity-Aware Proxy (a load balancer, or IAP on Cloud Run directly):
  the signed ``x-goog-iap-jwt-assertion`` header, verified by
  :class:`~tokenbroker.issue.iap.IapVerifier`.

Then the allow-list (``TOKENBROKER_CONNECT_OPERATORS``): exact emails (``user:`` and
``serviceAccount:`` prefixes accepted, as IAM writes members) or ``domain:NAME``. A Google
group cannot be checked here without the Cloud Identity API: groups belong in the IAM binding
(who reaches the function), and the allow-list names who, of those, may connect accounts.
An empty allow-list is a configuration error: the function never serves "anyone IAM let in"
by accident.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from tokenbroker.issue.iap import IapVerifier
from tokenbroker.issue.idtoken import IdTokenVerifier
from tokenbroker.kernel.errors import ConfigError, PolicyDenied
from tokenbroker.kernel.fields import ascii_lower
from tokenbroker.kernel.model import Caller

#: The gcloud CLI's OAuth client id: the ``aud`` of ``gcloud auth print-identity-token`` (and of
#: what ``gcloud run services proxy`` sends) for a user account.
GCLOUD_CLIENT_ID = "32555940559.apps.googleusercontent.com"


class OperatorIdentity(Protocol):
    """The operator a request comes from, or InvalidCallerToken (401)."""

    def operator(self, headers: Mapping[str, str]) -> Caller: ...


@dataclass(frozen=True)
class PlatformOperators:
    """``platform`` mode: the ID token Cloud Run's IAM front end verified."""

    verifier: IdTokenVerifier

    def operator(self, headers: Mapping[str, str]) -> Caller:
        pairs = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        return self.verifier.verify_authorization(self.verifier.select_authorization(pairs))


@dataclass(frozen=True)
class IapOperators:
    """``iap`` mode: IAP's signed header."""

    verifier: IapVerifier

    def operator(self, headers: Mapping[str, str]) -> Caller:
        return self.verifier.verify_headers(headers)


@dataclass(frozen=True)
class OperatorAllowList:
    emails: frozenset[str]
    domains: frozenset[str]

    @classmethod
    def parse(cls, entries: Iterable[str], where: str) -> OperatorAllowList:
        emails: set[str] = set()
        domains: set[str] = set()
        for raw in entries:
            entry = raw.strip()
            kind, _, value = entry.partition(":") if ":" in entry else ("", "", entry)
            value = ascii_lower(value.strip())
            if kind == "domain" and value and "@" not in value:
                domains.add(value)
            elif kind in ("", "user", "serviceAccount") and value.count("@") == 1:
                emails.add(value)
            elif kind == "group":
                raise ConfigError(
                    f"{where}: groups cannot be checked by the function; bind the group with "
                    "IAM (operators) and list the emails or domain:NAME allowed to connect"
                )
            else:
                raise ConfigError(f"{where}: {entry[:60]!r} is not an email or domain:NAME")
        if not emails and not domains:
            raise ConfigError(f"{where}: no operator may connect accounts; list at least one")
        return cls(frozenset(emails), frozenset(domains))

    def check(self, caller: Caller) -> str:
        """The operator's email, or PolicyDenied (403)."""
        email = ascii_lower(caller.email)
        if email in self.emails or email.rpartition("@")[2] in self.domains:
            return email
        raise PolicyDenied(f"{email} is not an operator of this broker")


__all__ = [
    "GCLOUD_CLIENT_ID",
    "IapOperators",
    "OperatorAllowList",
    "OperatorIdentity",
    "PlatformOperators",
]
