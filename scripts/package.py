"""Builds the deployable Cloud Functions source packages: ``dist/functions/<name>.zip``.

Each zip is what ``gcloud functions deploy --source`` (or Terraform's
``build_config.source.storage_source``) uploads, and all the Python buildpack needs:

* ``main.py`` -- the function's thin adapter, from ``functions/<name>/main.py``;
* ``tokenbroker-<version>-py3-none-any.whl`` -- the library, built from the commit;
* ``requirements.txt`` -- every distribution the function needs, exported from ``uv.lock``
  with hashes (``uv export --no-dev --no-emit-project --extra ... --prune ...``), and the
  vendored wheel by its relative path and sha256. One hash makes pip verify all: in hash-checking
  mode every requirement must be pinned and hashed, the local wheel included
  (https://pip.pypa.io/en/stable/topics/secure-installs/). The buildpack runs
  ``pip install --requirement requirements.txt`` in the source directory, so the relative path
  resolves there (GoogleCloudPlatform/buildpacks, ``pkg/python/python.go``).

Reproducible: the package is built from the committed tree (``git archive HEAD``, never the
work tree's uncommitted edits; a tree without ``.git``, as ``gcloud builds submit`` uploads by
default, is packaged as it is, dated by ``SOURCE_DATE_EPOCH`` or 1980-01-01 and labelled with
``COMMIT_SHA`` when Cloud Build sets it), the wheel by a hash-pinned build backend
(``scripts/build-constraints.txt``) with ``SOURCE_DATE_EPOCH`` = the commit's time, and the zip
with sorted entries, that same timestamp, mode 0644 and one compression level -- so one commit
gives byte-identical zips on every machine.

What each function gets (``uv.lock`` extras, then what it does not use pruned with its
exclusive dependencies):

* **refresher** -- ``functions`` + ``gcp``, without ``google-cloud-iam`` (only the issuer
  impersonates service accounts) and without ``httptools``/``uvloop`` (uvicorn's speed-ups: the
  refresher is a Flask target served by gunicorn, never by uvicorn);
* **issuer** -- ``functions`` + ``gcp``, without ``google-cloud-pubsub`` (the issuer never
  publishes: events are the refresher's). It keeps ``httptools``/``uvloop``: it is served as ASGI
  by uvicorn, ~2x faster with them (bench/issuer_throughput.py).
* **connect** -- ``functions`` + ``gcp`` without what the refresher also goes without: it
  stores credentials, sessions and events like the refresher, and is a Flask target.

``--backend aws`` (credentials in AWS Secrets Manager, the ``aws`` preset) adds the ``aws``
extra (boto3) to both: the issuer reads the same credentials the refresher writes. The default,
``gcp``, leaves boto3 out of both.

Usage: ``scripts/package [--backend gcp|aws] [--out DIR] [NAME ...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UV = REPO / ".tools" / "bin" / "uv"
BUILD_CONSTRAINTS = REPO / "scripts" / "build-constraints.txt"
DEFAULT_OUT = REPO / "dist" / "functions"
#: What ``git archive`` takes from the commit: what the wheel and the packages are built from.
SOURCES = ("pyproject.toml", "uv.lock", "README.md", "shared", "functions")
#: Zip timestamps cannot predate 1980 (the DOS date format).
ZIP_EPOCH_FLOOR = 315_532_800


@dataclass(frozen=True)
class FunctionPackage:
    """What one function's package holds: ``uv.lock`` extras, minus what it never imports."""

    name: str
    extras: tuple[str, ...]
    prune: tuple[str, ...]


PACKAGES = {
    "refresher": FunctionPackage(
        "refresher", ("functions", "gcp"), ("google-cloud-iam", "httptools", "uvloop")
    ),
    "issuer": FunctionPackage("issuer", ("functions", "gcp"), ("google-cloud-pubsub",)),
    "connect": FunctionPackage(
        "connect", ("functions", "gcp"), ("google-cloud-iam", "httptools", "uvloop")
    ),
}
#: Extras each backend preset adds to every function (both read the secret store).
BACKEND_EXTRAS = {"gcp": (), "aws": ("aws",)}


class PackageError(Exception):
    """A step failed; the message says which and why."""


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> bytes:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, env=env, check=False, timeout=600
    )
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).decode(errors="replace").strip()[-2000:]
        raise PackageError(f"{Path(str(args[0])).name} {args[1]} failed: {detail}")
    return done.stdout


def _commit() -> tuple[str, int]:
    """The commit packaged and its time (the packages' ``SOURCE_DATE_EPOCH``)."""
    commit, seconds = _run("git", "log", "-1", "--format=%H %ct", cwd=REPO).decode().split()
    return commit, int(seconds)


def _warn_if_dirty() -> None:
    status = _run("git", "status", "--porcelain", "--", *SOURCES, cwd=REPO).decode()
    if status.strip():
        print(
            "package: uncommitted changes are NOT packaged (the packages are built from HEAD):\n"
            + status,
            file=sys.stderr,
        )


def _export_tree(commit: str, into: Path) -> Path:
    archive = _run("git", "archive", "--format=tar", commit, "--", *SOURCES, cwd=REPO)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _is_checkout() -> bool:
    return (REPO / ".git").exists()


def _copy_tree(into: Path) -> Path:
    """A source tree without git history (``gcloud builds submit`` leaves ``.git`` out by
    default): the files as they are, less bytecode."""
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    into.mkdir(parents=True)
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, into / name, ignore=junk)
        else:
            shutil.copy2(path, into / name)
    return into


def _tree_epoch() -> int:
    """Without a commit to date the package: ``SOURCE_DATE_EPOCH`` if set, else 1980-01-01."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not raw:
        return ZIP_EPOCH_FLOOR
    if not raw.isdigit():
        raise PackageError(f"SOURCE_DATE_EPOCH must be seconds since 1970, not {raw!r}")
    return int(raw)


def _build_wheel(source: Path, out: Path, epoch: int) -> Path:
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    _run(
        UV, "build", "--wheel", "--quiet", "--out-dir", out,
        "--build-constraints", BUILD_CONSTRAINTS, "--require-hashes",
        cwd=source, env=env,
    )  # fmt: skip
    (wheel,) = out.glob("tokenbroker-*.whl")
    return wheel


def requirements(source: Path, package: FunctionPackage, backend: str) -> str:
    """The function's pinned, hashed requirements from ``uv.lock`` (without the project)."""
    extras = (*package.extras, *BACKEND_EXTRAS[backend])
    args: list[str | Path] = [
        UV, "export", "--locked", "--no-dev", "--no-emit-project", "--no-header",
        "--format", "requirements-txt",
    ]  # fmt: skip
    for extra in extras:
        args += ["--extra", extra]
    for name in package.prune:
        args += ["--prune", name]
    return _run(*args, cwd=source).decode()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _requirements_txt(
    exported: str, wheel: Path, package: FunctionPackage, backend: str, commit: str
) -> str:
    extras = ",".join((*package.extras, *BACKEND_EXTRAS[backend]))
    pruned = ", ".join(package.prune) or "nothing"
    return (
        f"# tokenbroker {package.name} function, commit {commit}, backend {backend}.\n"
        f"# Generated by scripts/package from uv.lock: extras [{extras}], without {pruned}.\n"
        "# Every line is pinned with its hashes, the vendored library wheel too: pip installs\n"
        "# this file in hash-checking mode (pip install -r requirements.txt).\n"
        f"./{wheel.name} \\\n    --hash=sha256:{_sha256(wheel)}\n" + exported
    )


def write_zip(target: Path, files: dict[str, bytes], epoch: int) -> None:
    """A zip that depends only on ``files`` and ``epoch``: sorted entries, fixed timestamps,
    mode 0644, one compression level."""
    stamp = time.gmtime(max(epoch, ZIP_EPOCH_FLOOR))[:6]
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(partial, "w") as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.create_system = 3  # Unix: the mode bits below mean what they say
            info.external_attr = (0o100644 & 0xFFFF) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, files[name], compresslevel=9)
    partial.replace(target)


def build(names: list[str], *, out: Path, backend: str) -> list[Path]:
    """Build the named functions' packages into ``out``; returns their paths."""
    unknown = sorted(set(names) - set(PACKAGES))
    if unknown:
        raise PackageError(f"no such function: {', '.join(unknown)} (known: {', '.join(PACKAGES)})")
    if backend not in BACKEND_EXTRAS:
        raise PackageError(f"backend must be one of {', '.join(BACKEND_EXTRAS)}, not {backend!r}")
    if not UV.exists():
        raise PackageError(f"{UV} is missing: run scripts/bootstrap first")
    checkout = _is_checkout()
    if checkout:
        _warn_if_dirty()
        commit, epoch = _commit()
    else:
        commit, epoch = os.environ.get("COMMIT_SHA") or "unknown (no .git)", _tree_epoch()
        print("package: not a git checkout: packaging the files as they are", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    built = []
    with tempfile.TemporaryDirectory(prefix="tokenbroker-package-") as scratch:
        if checkout:
            source = _export_tree(commit, Path(scratch) / "source")
        else:
            source = _copy_tree(Path(scratch) / "source")
        wheel = _build_wheel(source, Path(scratch) / "wheel", epoch)
        for name in names:
            package = PACKAGES[name]
            exported = requirements(source, package, backend)
            files = {
                "main.py": (source / "functions" / name / "main.py").read_bytes(),
                "requirements.txt": _requirements_txt(
                    exported, wheel, package, backend, commit
                ).encode(),
                wheel.name: wheel.read_bytes(),
            }
            target = out / f"{name}.zip"
            write_zip(target, files, epoch)
            built.append(target)
            print(f"{target}  sha256:{_sha256(target)}  ({target.stat().st_size} bytes)")
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/package", description="Build the Cloud Functions source zips."
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="refresher, issuer, connect (default: all)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: dist/functions")
    parser.add_argument(
        "--backend", default="gcp", choices=sorted(BACKEND_EXTRAS),
        help="the preset the functions run with (aws adds boto3 to both); default: gcp",
    )  # fmt: skip
    options = parser.parse_args(argv)
    try:
        build(options.names or list(PACKAGES), out=options.out.resolve(), backend=options.backend)
    except PackageError as error:
        print(f"package: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
