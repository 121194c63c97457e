"""The broker's HTML pages (the loopback callback, the connect function): one look, one set
of headers.

Minimal and accessible: a language, a title, a heading, what happened, what to do next; no
script, no third-party asset, no image. The Content-Security-Policy allows nothing but the
page's own inline style (``default-src 'none'``), no ``<base>``, no framing; forms may post
only where the page says (``form-action``: ``'none'`` unless a page has a form).
``Referrer-Policy: no-referrer`` and ``Cache-Control: no-store`` keep callback URLs (they
hold a code) out of referrers and caches. Every value put into a page is HTML-escaped; no
page ever carries a code, a verifier or a token.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

#: What a page may load: nothing but its own inline style.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem;"
    "line-height:1.5;color:#1a1a1a}h1{font-size:1.5rem}.ok{color:#0a5d00}.bad{color:#a00}"
    "table{border-collapse:collapse}td,th{padding:.25rem .75rem .25rem 0;text-align:left}"
    "button{font:inherit;padding:.25rem .75rem}"
)


def headers_with_form_action(sources: Iterable[str]) -> dict[str, str]:
    """:data:`PAGE_HEADERS` for a page whose forms post to ``'self'`` and may be redirected
    to ``sources`` (browsers apply ``form-action`` to the redirects after a submission)."""
    allowed = " ".join(["'self'", *sorted(set(sources))])
    policy = CONTENT_SECURITY_POLICY.replace("form-action 'none'", f"form-action {allowed}")
    return {**PAGE_HEADERS, "Content-Security-Policy": policy}


def document(title: str, body: str) -> str:
    """A whole page around ``body`` (already-escaped HTML)."""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>tokenbroker: {html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def page(title: str, message: str, *, ok: bool, next_step: str) -> str:
    """The whole page: a heading, what happened, what to do next."""
    tone = "ok" if ok else "bad"
    return document(
        title,
        f'<h1 class="{tone}">{html.escape(title)}</h1>'
        f"<p>{html.escape(message)}</p><p>{html.escape(next_step)}</p>",
    )


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "PAGE_HEADERS",
    "document",
    "headers_with_form_action",
    "page",
]
