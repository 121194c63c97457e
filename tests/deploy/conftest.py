"""The Terraform tests, each module marked ``terraform`` (run them alone: ``-m terraform``).

Their tools come from ``tests/deploy/install-tools`` (``.ci/run`` calls it); a test whose tool is
missing skips and names it.
"""
