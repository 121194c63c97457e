"""The Cloud Functions runtime the packages pin, and how it serves each target.

The deployed runtime starts ``functions-framework`` with the target and signature type in
``FUNCTION_TARGET`` / ``FUNCTION_SIGNATURE_TYPE`` and no ``--asgi`` (the Python buildpack's web
process is the bare command: GoogleCloudPlatform/buildpacks,
``cmd/python/functions_framework``). The issuer's ``@aio.http`` target is served by the ASGI
app only because ``create_app`` hands a target registered by ``functions_framework.aio`` to
``create_asgi_app_from_module``: that module and that hand-over first shipped in
functions-framework 3.9.0 (3.8.3, the last 3.8, has neither: ``from functions_framework import
aio`` fails), so the pin must exclude everything before it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import flask
import functions_framework
from packaging.requirements import Requirement
from starlette.applications import Starlette

REPO = Path(__file__).resolve().parents[3]
#: The first release with ``functions_framework.aio`` and the ASGI hand-over in ``create_app``
#: (checked by installing 3.8.3, 3.9.0, 3.9.1, 3.9.2 and 3.10.0 into scratch environments).
FIRST_WITH_AIO = "3.9.0"
WITHOUT_AIO = ("3.8.0", "3.8.1", "3.8.2", "3.8.3", "3.7.0")


def _pinned() -> Requirement:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (requirement,) = [
        Requirement(spec)
        for spec in project["optional-dependencies"]["functions"]
        if Requirement(spec).name == "functions-framework"
    ]
    return requirement


def _locked_version(name: str) -> str:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    (version,) = [p["version"] for p in lock["package"] if p["name"] == name]
    return str(version)


def test_the_pinned_range_excludes_every_release_without_aio() -> None:
    specifier = _pinned().specifier
    assert not [v for v in WITHOUT_AIO if specifier.contains(v)], specifier
    assert specifier.contains(FIRST_WITH_AIO)
    assert specifier.contains(_locked_version("functions-framework"))
    assert not specifier.contains("4.0.0")  # a new major may change how targets are served


def test_the_runtime_serves_the_issuer_as_asgi_without_the_asgi_flag() -> None:
    """``create_app`` is what the bare ``functions-framework`` command calls."""
    app = functions_framework.create_app("issue", str(REPO / "functions" / "issuer" / "main.py"))
    assert isinstance(app, Starlette)
    assert not isinstance(app, flask.Flask)


def test_the_refresher_targets_are_flask_apps() -> None:
    source = str(REPO / "functions" / "refresher" / "main.py")
    assert isinstance(functions_framework.create_app("refresh_http", source), flask.Flask)
    assert isinstance(functions_framework.create_app("refresh", source, "cloudevent"), flask.Flask)
