"""docs/operations.md documents every metric of the catalogue as the catalogue declares it (the
table is generated: ``python -m tests.deploy.operations_doc``)."""

from __future__ import annotations

import pytest

from tests.deploy import operations_doc
from tokenbroker.kernel import metrics

pytestmark = pytest.mark.terraform


def test_the_metrics_table_matches_the_catalogue() -> None:
    assert operations_doc.current() == operations_doc.render(), (
        "docs/operations.md is stale: run .venv/bin/python -m tests.deploy.operations_doc"
    )


def test_every_metric_has_a_writer_and_every_label_its_bounds() -> None:
    table = operations_doc.render()
    for m in metrics.CATALOGUE:
        assert operations_doc.writer(m)
        (row,) = [line for line in table.splitlines() if line.startswith(f"| `{m.name}` |")]
        for label in m.labels:
            assert f"`{label.key}`" in row, (m.name, label.key)
            for value in label.values or ():
                assert f"`{value}`" in row, (m.name, value)
