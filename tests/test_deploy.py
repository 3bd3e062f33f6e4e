"""The compose stack and the worker image, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from activities.resilience.sanitize import is_secret_key
from contracts.search_attributes import SEARCH_ATTRIBUTES
from workers.settings import OnexSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
REFERENCE = re.compile(r"^\$\{[A-Z_]+(:\?[^}]*)?\}$")


def test_every_dependency_names_a_service_and_every_service_runs_something() -> None:
    """depends_on only names services of the file; each service has an image or a build."""
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"


def test_mounted_and_built_files_exist() -> None:
    """Every bind mount and Dockerfile the stack uses is in the repository."""
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).exists(), name
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", dockerfile, flags=re.MULTILINE):
        assert (ROOT / source).exists(), f"the Dockerfile copies missing {source}"


def _environments() -> list[tuple[str, str, str]]:
    found = []
    for name, service in SERVICES.items():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            found.append((name, key, str(value)))
    return found


@pytest.mark.parametrize(("service", "key", "value"), _environments())
def test_no_secret_is_written_in_the_file(service: str, key: str, value: str) -> None:
    """Every variable that looks like a credential is a ${VAR:?} reference to the caller's
    environment, never a value. (Secret *sources* name where a secret lives, not its value.)"""
    if key == "ONEX_SECRETS__SOURCES":
        sources = json.loads(value)
        assert all(re.match(r"^(env|file|vault):", source) for source in sources.values())
        return
    if is_secret_key(key):
        assert REFERENCE.match(value), (
            f"{service}.{key} holds a literal value.\n\n"
            "HOW TO FIX: write ${SOME_VAR:?set SOME_VAR} and document the variable."
        )


def test_the_worker_environment_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's ONEX_* variables are known settings with valid values."""
    environment = SERVICES["worker"]["environment"]
    for key, value in environment.items():
        monkeypatch.setenv(key, "placeholder-token" if REFERENCE.match(str(value)) else value)
    settings = OnexSettings()
    assert settings.temporal.target == "temporal:7233"
    assert settings.consul.enabled
    assert settings.vault.enabled
    assert settings.kafka.enable_idempotence, "real Kafka supports idempotent producers"
    assert "database.postgres.password" in settings.secrets.sources


def test_the_search_attributes_are_registered() -> None:
    """The stack registers exactly the search attributes the workflows use."""
    command = " ".join(SERVICES["temporal-search-attributes"]["command"])
    names = re.search(r"for name in ([A-Za-z ]+); do", command)
    assert names is not None
    assert set(names.group(1).split()) == set(SEARCH_ATTRIBUTES)


def test_the_worker_drains_before_it_is_killed() -> None:
    """Docker's stop grace period outlasts the worker's 30 s graceful shutdown."""
    grace = SERVICES["worker"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > OnexSettings().worker.graceful_shutdown_timeout
