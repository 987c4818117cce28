"""The production layout files (docker/, docs/systemd/, docs/deployment.md) hold together:
every service has a health check, and every command they run exists in this repository.

No container engine is needed: the compose file is read as YAML, the units as INI."""

from __future__ import annotations

import configparser
import importlib
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from django.core.management import get_commands

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
UNITS = ROOT / "docs" / "systemd"
SERVICES = {"postgres", "redis", "web", "worker", "beat", "filter", "clamd", "spamd", "postfix"}
# Variables of docker/.env that only Compose and the Postfix container read.
COMPOSE_ONLY = {"POSTGRES_PASSWORD", "MAIL_HOSTNAME", "SPAMVIEWER_SUBNET"}


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def _argv(command) -> list[str]:
    """A compose `command` as argv; `sh -c "a && b"` becomes the words of a and b."""
    words = command if isinstance(command, list) else shlex.split(command)
    if words[:2] == ["sh", "-c"]:
        return shlex.split(words[2].replace("&&", " "))
    return words


def _check_runs_something_real(argv: list[str]) -> set[str]:
    """What argv runs: Django commands, the Celery app and its subcommand, a WSGI app.
    Fails on anything that does not exist here."""
    found = set()
    for i, word in enumerate(argv):
        if word == "manage.py":
            name = argv[i + 1]
            assert name in get_commands(), f"manage.py {name}: no such command"
            found.add(f"manage.py {name}")
        elif word == "-A":
            app = argv[i + 1]
            module = importlib.import_module(f"{app}.celery")
            assert module.app.main == app
            sub = argv[i + 2]
            assert sub in {"worker", "beat"}, sub
            found.add(f"celery {sub}")
        elif ":" in word and re.fullmatch(r"[a-z_.]+:[a-z_]+", word):
            module, _, attr = word.partition(":")
            assert callable(getattr(importlib.import_module(module), attr)), word
            found.add(word)
    return found


def test_the_compose_file_has_every_service_with_a_health_check():
    compose = _compose()
    assert set(compose["services"]) == SERVICES
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
        assert service.get("restart") == "unless-stopped", name


def test_the_spamviewer_services_run_real_commands_of_this_repository():
    services = _compose()["services"]
    expected = {
        "web": {"manage.py migrate", "manage.py ensurevadmin", "spamviewer.wsgi:application"},
        "worker": {"celery worker"},
        "beat": {"celery beat"},
        "filter": {"manage.py runfilter"},
    }
    for name, wanted in expected.items():
        service = services[name]
        assert service["image"] == "spamviewer:latest", name
        assert service["build"]["target"] == "spamviewer", name
        assert _check_runs_something_real(_argv(service["command"])) == wanted, name
    assert "celery -A spamviewer inspect ping" in services["worker"]["healthcheck"]["test"][1]


def test_the_compose_file_keeps_the_store_and_the_database_on_volumes():
    compose = _compose()
    services = compose["services"]
    assert {"database", "store", "relaymap", "redis"} <= set(compose["volumes"])
    assert "database:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    for name in ("web", "worker", "beat", "filter"):
        service = services[name]
        assert "store:/var/lib/spamviewer" in service["volumes"], name
        assert service["env_file"] == ".env", name
        environment = service["environment"]
        assert environment["DATABASE_URL"].startswith("postgresql://"), name
        assert environment["REDIS_URL"] == "redis://redis:6379/0", name
    # The web port is for the reverse proxy on the host only.
    assert services["web"]["ports"] == ["127.0.0.1:8000:8000"]
    assert "relaymap:/etc/postfix/spamviewer:ro" in services["postfix"]["volumes"]


def test_the_dockerfile_builds_what_compose_asks_for_from_files_that_exist():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE))
    targets = {s["build"]["target"] for s in _compose()["services"].values() if "build" in s}
    assert targets <= stages
    # The application image is the last stage: a plain `docker build` makes it.
    assert re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE)[-1] == "spamviewer"
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert os.access(DOCKER / "postfix-entrypoint.sh", os.X_OK)
    assert "HTTPS_ONLY=True" in dockerfile and "BEHIND_PROXY=True" in dockerfile


def test_the_postfix_entrypoint_is_valid_shell():
    subprocess.run(["sh", "-n", str(DOCKER / "postfix-entrypoint.sh")], check=True)


def test_every_variable_of_the_example_env_file_is_documented():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", docs))
    names = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", (DOCKER / "env.example").read_text(),
                           re.MULTILINE))
    assert {"SECRET_KEY", "ALLOWED_HOSTS", "HTTPS_ONLY"} <= names
    assert not names - documented - COMPOSE_ONLY


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string((UNITS / name).read_text())
    return parser


@pytest.mark.parametrize("unit, runs", [
    ("spamviewer-web.service", {"spamviewer.wsgi:application"}),
    ("spamviewer-filter.service", {"manage.py runfilter"}),
    ("spamviewer-celery.service", {"celery worker"}),
    ("spamviewer-beat.service", {"celery beat"}),
])
def test_the_systemd_units_run_real_commands_with_hardening(unit, runs):
    service = _unit(unit)["Service"]
    argv = shlex.split(service["ExecStart"].replace("\\\n", " "))
    assert argv[0].startswith("/srv/spamviewer/.venv/bin/")
    assert _check_runs_something_real(argv) == runs
    assert service["User"] == "spamviewer"
    assert service["EnvironmentFile"] == "/etc/spamviewer/spamviewer.env"
    for option, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                          "ProtectHome": "yes", "PrivateTmp": "yes",
                          "CapabilityBoundingSet": "", "RestrictSUIDSGID": "yes"}.items():
        assert service.get(option) == value, f"{unit}: {option}"
    assert service["ReadWritePaths"].startswith("/var/lib/spamviewer")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_units(tmp_path):
    # The units name /srv/spamviewer; here the checkout stands in for it.
    units = tmp_path / "units"
    units.mkdir()
    for unit in UNITS.glob("*.service"):
        (units / unit.name).write_text(unit.read_text().replace("/srv/spamviewer", str(ROOT)))
    result = subprocess.run(["systemd-analyze", "verify", *sorted(map(str, units.iterdir()))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "spamviewer" not in result.stderr, result.stderr


def test_the_deployment_guide_covers_the_operations():
    guide = (ROOT / "docs" / "deployment.md").read_text()
    for topic in ("docker/compose.yml", "HTTPS_ONLY", "BEHIND_PROXY", "indexquarantine",
                  "pg_dump", "migrate", "collectstatic", "manage.py postfixconfig",
                  "runfilter --postfix-config", *(f"{u}.service" for u in (
                      "spamviewer-web", "spamviewer-filter", "spamviewer-celery",
                      "spamviewer-beat"))):
        assert topic in guide, topic
