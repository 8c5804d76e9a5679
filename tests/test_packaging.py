"""The wheel holds every package the folders map to, and runs without the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pip, which builds the wheel below, carries a TOML reader on 3.10
    from pip._vendor import tomli as tomllib

MIGRATIONS = ROOT / "migrations" / "versions"  # each file's stem is its revision id


def _source_files_of_mapped_packages() -> list[str]:
    """Every module of every folder pyproject maps into the ``trimtab`` namespace, as wheel paths."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders: dict[str, str] = config["package-dir"]
    out = []
    for package in config["packages"]:
        # the longest mapped prefix names the folder; the rest of the dotted name is below it
        prefix = max((p for p in folders if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / folders[prefix] / package[len(prefix) + 1 :].replace(".", "/")
        out += [f"{package.replace('.', '/')}/{f.name}" for f in folder.glob("*.py")]
    # a folder of modules that pyproject forgot is a package the wheel would silently drop
    for folder_name in folders.values():
        for init in (ROOT / folder_name).rglob("__init__.py"):
            dotted = init.parent.relative_to(ROOT / folder_name).as_posix().replace("/", ".")
            prefix = next(p for p, f in folders.items() if f == folder_name)
            package = prefix if dotted == "." else f"{prefix}.{dotted}"
            assert package in config["packages"], f"{package} ({init.parent}) is not in pyproject's packages"
    return out


def test_wheel_contains_the_mapped_packages_and_migrations(tmp_path: Path) -> None:
    # Built from a copy of only what the wheel is made of: a build/ folder left in the checkout
    # by an earlier build would otherwise lend the wheel stale modules and hide a missing package.
    source = tmp_path / "source"
    for name in ("agent", "server", "dashboard", "migrations"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("trimtab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"trimtab/py.typed", "trimtab/migrations/script.py.mako"}
    expected |= {f"trimtab/migrations/versions/{p.name}" for p in MIGRATIONS.glob("0*.py")}
    expected |= set(_source_files_of_mapped_packages())
    assert len(expected) > 60, expected  # the mapping below found the source tree
    missing = sorted(expected - names)
    assert not missing, f"missing from {wheel.name}: {missing}"
    assert not any(n.startswith(("agent/", "server/", "tests/")) for n in names)

    # Installed from the wheel alone (no source tree on the path), the CLI migrates a database.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    db = tmp_path / "wheel.db"
    code = f"import sys; sys.path.insert(0, {str(target)!r}); from trimtab.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", code, "db", "upgrade", "--db", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    newest = max(p.stem for p in MIGRATIONS.glob("0*.py"))
    assert f"at revision {newest}" in result.stdout, result.stdout
