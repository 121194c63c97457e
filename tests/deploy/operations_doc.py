"""The metrics table of ``docs/operations.md``, generated from the library's catalogue.

    .venv/bin/python -m tests.deploy.operations_doc           # rewrite the table in place
    .venv/bin/python -m tests.deploy.operations_doc --check   # exit 1 when it is stale

``tokenbroker.kernel.metrics.CATALOGUE`` is the contract (its docstring says this page is made
from it); ``test_operations_doc.py`` fails when the page and the catalogue differ. Who writes a
metric, and when, is the catalogue's prefix: ``refresh/``, ``connection/`` and ``fleet/`` are
the refresher's, once per tick; ``issuer/`` is the issuer's, once per 60 s interval.
"""

from __future__ import annotations

import re
import sys

from tests.deploy.hcl import ROOT
from tokenbroker.kernel import metrics

PAGE = ROOT / "docs" / "operations.md"
BEGIN = "<!-- BEGIN GENERATED: python -m tests.deploy.operations_doc -->"
END = "<!-- END GENERATED -->"

#: Who writes each group of metrics, and when (docs/operations.md, Metrics).
WRITERS = {
    "refresh/": "refresher, once per tick",
    "connection/": (
        f"refresher, once per tick, at most {metrics.DEFAULT_CONNECTION_LIMIT} connections"
        " (failing first, then at risk, then nearest expiry; never disabled)"
    ),
    "fleet/": "refresher, once per tick",
    "issuer/": "issuer, once per 60 s interval",
}


def writer(metric: metrics.Metric) -> str:
    (found,) = [w for prefix, w in WRITERS.items() if metric.name.startswith(prefix)]
    return found


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _labels(metric: metrics.Metric) -> str:
    if not metric.labels:
        return "none"
    parts = []
    for label in metric.labels:
        bound = (
            ", ".join(f"`{v}`" for v in label.values)
            if label.values is not None
            else _cell(label.description)
        )
        parts.append(f"`{label.key}`: {bound}")
    return "<br>".join(parts)


def render() -> str:
    header = (
        "| metric (`custom.googleapis.com/tokenbroker/...`) | kind | value | unit "
        "| labels and their values | written by | what it is |"
    )
    lines = [BEGIN, "", header, "|---|---|---|---|---|---|---|"]
    lines += [
        f"| `{m.name}` | {m.kind.value} | {m.value_type.value} | `{m.unit}` | {_labels(m)} "
        f"| {writer(m)} | {_cell(m.description)} |"
        for m in metrics.CATALOGUE
    ]
    lines += ["", END]
    return "\n".join(lines)


def current() -> str | None:
    match = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), PAGE.read_text(), re.DOTALL)
    return match[0] if match else None


def main(argv: list[str]) -> int:
    table = render()
    if "--check" in argv:
        if current() != table:
            print("docs/operations.md: the metrics table is stale; run this module to rewrite it")
            return 1
        return 0
    text = PAGE.read_text()
    found = current()
    assert found is not None, f"{PAGE}: no {BEGIN} ... {END} section"
    PAGE.write_text(text.replace(found, table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
