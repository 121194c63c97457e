"""The fault suite at full size: what crashes, races, provider faults, store outages, stale
holders, clock steps and slow parts cost, counted against real parts.

Every scenario of ``tests/support/chaos_suite.py`` runs (``--only`` picks some) against
oidc-provider rotating refresh tokens and revoking the grant on reuse, behind a fault
proxy that keeps a ledger of every refresh token presented; the embedded store on disk;
the Firestore and Pub/Sub emulators and the Secret Manager test server behind TCP proxies;
refreshers as real processes (``tokenbroker refresh``/``serve``, the refresher function
under functions-framework). The gcp scenarios are skipped, and say so, when the emulators
are not installed.

A connection is lost when the refresh token the broker holds for it is no longer accepted by
the provider (consumed, or its grant revoked) or none is stored: asked of the provider, not
inferred. Each lost connection exposed to a kill (or to a store fault) is classified by where
the kill caught it: ``not_sent``, ``on_the_wire`` (the provider rotated, the answer never
reached the refresher), ``answered_not_durable``, ``durable``.

Progress and one JSON object per scenario go to stderr; the last line on stdout is one JSON
object: ``scenarios``, ``faults_injected``, ``refreshes``, ``invalid_grant``,
``connections_lost``, ``lost_by_kill_point``, ``lost_by_stage``, ``loss_window_ms`` (p50/p99
of answer delivered -> first stored, over every stored rotation), ``checks_failed`` (the
goals of issue 8 that did not hold), ``skipped``, ``leaks`` (files of the run holding an
issued token) and ``seconds``.

Usage: ``.venv/bin/python bench/chaos.py [--quick] [--only NAME[,NAME...]] [--report FILE]``
(``--quick``: the CI size ``tests/system/test_chaos.py`` runs, about three minutes here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.chaos_suite import FULL, QUICK, SCENARIOS, run_suite  # noqa: E402

from tokenbroker.kernel.log import configure_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI size")
    parser.add_argument(
        "--only", help=f"comma-separated scenarios (of: {', '.join(SCENARIOS)}; brackets optional)"
    )
    parser.add_argument("--report", type=Path, help="also write every scenario's JSON here")
    args = parser.parse_args(argv)
    configure_logging("error")  # the harness's own registrations; the refreshers log apart
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    suite = run_suite(QUICK if args.quick else FULL, only=only)
    for result in suite.results:
        print(json.dumps(result.to_json()), file=sys.stderr)
    figures = suite.figures()
    if args.report is not None:
        args.report.write_text(
            json.dumps(
                {"figures": figures, "scenarios": [r.to_json() for r in suite.results]}, indent=1
            )
        )
    print(json.dumps(figures))
    return 1 if figures["scenario_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
