"""The dependency floors in pyproject.toml: none admits a release with a known advisory,
every runtime dependency is used by the package, and the installed versions satisfy them.

The advisory table is kept by hand (pip-audit needs a network advisory source): raise a
floor here and in pyproject.toml together, naming the advisory that moved it.
"""

from __future__ import annotations

import ast
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]

# package: (first release without a known advisory, the latest advisories it fixes)
FIXED_IN = {
    "aiohttp": (
        "3.14.3",
        "CVE-2026-69244 (3.14.3), CVE-2026-59881 and CVE-2026-69243 (3.14.2), "
        "CVE-2026-54273..54280 (3.14.1: pipelined requests queued without limit), "
        "CVE-2026-34993 and CVE-2026-47265 (3.14.0), CVE-2025-53643 (3.12.14: smuggling)",
    ),
    "asyncssh": (
        "2.23.1",
        "CVE-2026-54590, CVE-2026-54591 (2.23.1), CVE-2023-48795 Terrapin (2.14.2)",
    ),
    "cryptography": (
        "50.0.0",
        "CVE-2026-69247 (50.0.0), CVE-2026-34180 (48.0.1), CVE-2024-26130 (42.0.4)",
    ),
    "requests": ("2.32.4", "CVE-2024-47081 (2.32.4), CVE-2024-35195 (2.32.0)"),
}
# Distribution name -> the module the package imports it as.
MODULES = {"prometheus-client": "prometheus_client", "nats-py": "nats"}


def project() -> dict[str, list[Requirement]]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"runtime": data["dependencies"], **data["optional-dependencies"]}
    return {group: [Requirement(r) for r in reqs] for group, reqs in groups.items()}


def floor(requirement: Requirement) -> Version | None:
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    return max(floors, default=None)


def all_requirements() -> list[Requirement]:
    return [r for reqs in project().values() for r in reqs]


@pytest.mark.parametrize("name", sorted(FIXED_IN))
def test_no_floor_admits_a_release_with_a_known_advisory(name: str) -> None:
    fixed, advisories = FIXED_IN[name]
    [requirement] = [r for r in all_requirements() if r.name == name]
    lowest = floor(requirement)
    assert lowest is not None and lowest >= Version(fixed), (
        f"{requirement} admits releases before {fixed}: {advisories}"
    )


def imported_modules() -> set[str]:
    """Top-level modules imported anywhere in the firehosed package."""
    found: set[str] = set()
    for path in (REPO / "firehosed").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("requirement", project()["runtime"], ids=str)
def test_every_runtime_dependency_is_imported_by_the_package(requirement: Requirement) -> None:
    module = MODULES.get(requirement.name, requirement.name.replace("-", "_"))
    assert module in imported_modules(), f"{requirement.name} is a dependency nothing imports"


@pytest.mark.parametrize("requirement", all_requirements(), ids=str)
def test_the_installed_version_satisfies_its_requirement(requirement: Requirement) -> None:
    installed = metadata.version(requirement.name)
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{requirement.name} {installed} installed, {requirement} required"
    )
