"""The wheel holds every package the folders map to, and runs without the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import ROOT

MIGRATIONS = ROOT / "migrations" / "versions"  # each file's stem is its revision id


def test_wheel_contains_the_mapped_packages_and_migrations(tmp_path: Path) -> None:
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
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("trimtab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "trimtab/__init__.py",
        "trimtab/protocol.py",
        "trimtab/watch.py",
        "trimtab/integrations/lightning.py",
        "trimtab/integrations/transformers.py",
        "trimtab/py.typed",
        "trimtab/server/app.py",
        "trimtab/dashboard/__init__.py",
        "trimtab/migrations/env.py",
        "trimtab/migrations/script.py.mako",
        "trimtab/migrations/versions/0001_initial_schema.py",
        "trimtab/detectors/__init__.py",
        "trimtab/detectors/defaults.py",
        *(f"trimtab/migrations/versions/{p.name}" for p in MIGRATIONS.glob("0*.py")),
    ):
        assert required in names, f"{required} missing from {wheel.name}"
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
