"""The inputs and outputs tables of ``terraform/README.md``, generated from the module.

    .venv/bin/python -m tests.deploy.readme_table           # rewrite the tables in place
    .venv/bin/python -m tests.deploy.readme_table --check   # exit 1 when they are stale

``test_terraform_readme.py`` runs the check, so a variable added without regenerating fails.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from tests.deploy import hcl

README = hcl.TERRAFORM / "README.md"
BEGIN = "<!-- BEGIN GENERATED: python -m tests.deploy.readme_table -->"
END = "<!-- END GENERATED -->"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _type(declared: Any) -> str:
    text = declared if isinstance(declared, str) else json.dumps(declared)
    if text.startswith("${") and text.endswith("}"):
        text = text[2:-1]
    return f"`{_cell(text)}`"


def _default(body: hcl.Block) -> str:
    if "default" not in body:
        return "required"
    value = body["default"]
    if value is None:
        return "`null`"
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        return f"`{_cell(value[2:-1])}`"
    return f"`{_cell(json.dumps(value))}`"


def render() -> str:
    module = hcl.load(hcl.MODULE)
    lines = [
        BEGIN,
        "",
        "### Inputs",
        "",
        "| name | type | default | description |",
        "|---|---|---|---|",
    ]
    for name, body in module.variables.items():
        description = _cell(body.get("description", ""))
        lines.append(f"| `{name}` | {_type(body['type'])} | {_default(body)} | {description} |")
    lines += ["", "### Outputs", "", "| name | description |", "|---|---|"]
    for name, body in module.outputs.items():
        lines.append(f"| `{name}` | {_cell(body.get('description', ''))} |")
    lines += ["", END]
    return "\n".join(lines)


def current() -> str | None:
    text = README.read_text()
    match = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), text, re.DOTALL)
    return match[0] if match else None


def main(argv: list[str]) -> int:
    table = render()
    if "--check" in argv:
        if current() != table:
            print("terraform/README.md: tables are stale; run python -m tests.deploy.readme_table")
            return 1
        return 0
    text = README.read_text()
    if current() is None:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    else:
        text = text.replace(current() or "", table)
    README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
