"""Where a node's firmware versions come from: OPNsense's `opnsense-version`, found at its
installed path and run through the command runner, else this package's version."""

from __future__ import annotations

from pathlib import Path

from hasync import __version__
from hasync.core import versions

# prints what OPNsense's tool would for each flag the reply needs, and records how it was asked
FAKE_TOOL = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls"
case "$*" in
  "-v base") echo 26.1.2 ;;
  "-v kernel") echo 26.1.3 ;;
  "-v") echo 26.1.4_1 ;;
  *) exit 1 ;;
esac
"""


def installed_tool(tmp_path: Path) -> Path:
    tool = tmp_path / "sbin" / "opnsense-version"
    tool.parent.mkdir()
    tool.write_text(FAKE_TOOL)
    tool.chmod(0o755)
    return tool


def test_the_installed_tool_answers_each_part(tmp_path: Path) -> None:
    tool = installed_tool(tmp_path)
    assert versions.local_versions(tmp_path, tool=tool) == {
        "base": {"version": "26.1.2"}, "firmware": {"version": "26.1.4_1"}, "kernel": {"version": "26.1.3"}}
    assert (tool.parent / "calls").read_text().splitlines() == ["-v base", "-v", "-v kernel"]


def test_without_the_tool_the_package_version_answers(tmp_path: Path) -> None:
    """The control: the same call with the tool absent (or not executable) never runs it."""
    tool = installed_tool(tmp_path)
    tool.chmod(0o644)
    expected = {part: {"version": __version__} for part in ("base", "firmware", "kernel")}
    assert versions.local_versions(tmp_path, tool=tool) == expected
    assert versions.local_versions(tmp_path, tool=tmp_path / "nowhere") == expected
    assert not (tool.parent / "calls").exists()


def test_a_staged_override_wins(tmp_path: Path) -> None:
    tool = installed_tool(tmp_path)
    (tmp_path / versions.VERSION_OVERRIDE).write_text(
        '{"base": {"version": "1"}, "firmware": {"version": "2"}, "kernel": {"version": "3"}}')
    assert versions.local_versions(tmp_path, tool=tool)["firmware"] == {"version": "2"}
    assert not (tool.parent / "calls").exists()
