"""The clone is the whole product: metadata agrees with the pins, the licence
is there, and nothing reads outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(text: str) -> list[str]:
    """Requirement specifiers of a requirements file, comments and -r lines left out."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def normalised(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).replace("'", '"')


def pyproject_dependencies(text: str) -> list[str]:
    """The ``[project] dependencies`` strings (no TOML parser on Python 3.9)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    assert block, "pyproject.toml has no [project] dependencies"
    return re.findall(r'^\s*"(.*)",\s*$', block.group(1), re.M)


def test_pyproject_dependencies_are_the_pins_of_requirements_txt() -> None:
    pyproject = pyproject_dependencies((ROOT / "pyproject.toml").read_text())
    pinned = requirement_lines((ROOT / "requirements.txt").read_text())
    assert sorted(map(normalised, pyproject)) == sorted(map(normalised, pinned))


def test_the_metadata_names_the_python_versions_and_the_licence() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.9"' in text
    assert "GPL-3.0-or-later" in text
    licence = (ROOT / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in licence
    assert "Version 3, 29 June 2007" in licence


def test_every_fixture_folder_says_where_its_data_comes_from() -> None:
    readme = (ROOT / "tests" / "fixtures" / "README.md").read_text()
    folders = sorted(p.name for p in (ROOT / "tests" / "fixtures").iterdir() if p.is_dir())
    assert folders
    for folder in folders:
        assert f"`{folder}/" in readme, f"tests/fixtures/README.md says nothing of {folder}/"


@pytest.mark.slow
def test_no_tracked_file_points_outside_the_repository() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.sh", "*.in", "electricity", ".ci/*"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    outside = re.compile(r"\.\./shared|[\"']shared[\"']|/shared/fixtures|parents\[2\]|ROOT\.parent")
    offenders = [
        f"{name}:{number}: {line.strip()}"
        for name in tracked
        if name != "tests/test_packaging.py"
        for number, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert offenders == []


@pytest.mark.slow
def test_comments_point_at_design_notes_inside_the_repository() -> None:
    assert (ROOT / "docs" / "design.md").is_file()
    found = subprocess.run(
        ["git", "grep", "-n", "DESIGN.md", "--", ".", ":!tests/test_packaging.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    assert found == ""


@pytest.mark.slow
def test_every_test_data_file_is_in_the_repository() -> None:
    """A file ignored by git (devices.json is, for users' own) would pass here
    and be missing from every clone."""
    tracked = set(
        subprocess.run(
            ["git", "ls-files", "tests/fixtures"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    )
    present = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tests" / "fixtures").rglob("*")
        if path.is_file()
    }
    assert present - tracked == set()


@pytest.mark.slow
def test_tests_share_helpers_through_the_helpers_module_not_conftest() -> None:
    """conftest.py is pytest's (fixtures); importing it as a module runs it twice."""
    found = subprocess.run(
        ["git", "grep", "-n", "-E", "(from|import) (tests\\.)?conftest", "--", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    assert found == ""


@pytest.mark.slow
def test_scripts_import_the_project_without_editing_sys_path() -> None:
    """bench/ and tools/ find the collectors' modules through the venv's
    electricity.pth (written by ./electricity setup and systemd/install.sh)."""
    found = subprocess.run(
        ["git", "grep", "-n", "sys.path.insert", "--", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    # The firmware test hands MicroPython a script that sets its own path.
    assert [
        line
        for line in found
        if not line.startswith(("tests/test_esp32_firmware.py:", "tests/test_packaging.py:"))
    ] == []
