"""The Dockerfile and docker-compose.yml agree with what the app reads.

No Docker engine runs here, so the files are parsed: every BPRR_* variable they set is a
field of app.settings.Settings and its value validates, the exposed and published port is the
serve default, the health check's path is a route of the app that answers 200 when ready, the
database URLs use a scheme and driver the app can open, PostgreSQL has a health check that
the coordinator waits for, and the image runs the migrations, then `bprr serve`, as a
non-root user. A wheel of the project carries the dashboard's static files.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from app.api.app import create_app
from app.settings import Settings
from tests.api.conftest import make_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
ACCEPTED_DRIVERS = {"sqlite", "postgresql+psycopg"}
SETTINGS_ENV = {f"BPRR_{name.upper()}" for name in Settings.model_fields}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def last_stage() -> list[tuple[str, str]]:
    steps = instructions()
    start = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[start:]


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in last_stage():
        if keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} -> default and ${VAR:?message} -> a placeholder."""
    value = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{[A-Z0-9_]+:\?[^}]*\}", "set-by-the-operator", value)


def coordinator_env() -> dict[str, str]:
    env = compose()["services"]["coordinator"]["environment"]
    return {key: str(value) for key, value in env.items()}


def exec_form(rest: str) -> list[str]:
    import json

    parsed: list[str] = json.loads(rest)
    return parsed


def test_every_bprr_variable_is_a_setting_with_a_valid_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for source, env in (("Dockerfile", docker_env()), ("docker-compose.yml", coordinator_env())):
        bprr = {k: interpolate(v) for k, v in env.items() if k.startswith("BPRR_")}
        assert bprr, source
        unknown = set(bprr) - SETTINGS_ENV
        assert not unknown, f"{source} sets {sorted(unknown)}, which app.settings does not read"
        for key in list(os.environ):
            if key.startswith("BPRR_"):
                monkeypatch.delenv(key)
        for key, value in bprr.items():
            monkeypatch.setenv(key, value)
        try:
            Settings()
        except ValidationError as error:
            pytest.fail(f"{source}: {error}")
    # Every variable the compose file leaves to the operator is a token, never hard-coded.
    env = coordinator_env()
    for token in ("BPRR_ADMIN_TOKEN", "BPRR_JOIN_TOKEN"):
        assert re.fullmatch(rf"\$\{{{token}:\?[^}}]+\}}", env[token]), token
        assert token not in docker_env()


def test_ports_agree_with_the_serve_default() -> None:
    default = Settings.model_fields["port"].default
    exposed = [rest for keyword, rest in last_stage() if keyword == "EXPOSE"]
    assert exposed == [str(default)]
    assert docker_env()["BPRR_PORT"] == str(default)
    assert coordinator_env()["BPRR_PORT"] == str(default)
    assert docker_env()["BPRR_HOST"] == "0.0.0.0"  # reachable from outside the container
    published = compose()["services"]["coordinator"]["ports"]
    assert len(published) == 1 and str(published[0]).split(":")[-1] == str(default)


def test_the_health_check_path_is_the_apps_readiness_route(tmp_path: Path) -> None:
    (healthcheck,) = [rest for keyword, rest in last_stage() if keyword == "HEALTHCHECK"]
    command = exec_form(healthcheck.split("CMD", 1)[1].strip())
    assert command[0] == "python"  # python:3.11-slim has no curl
    paths = re.findall(r"http://127\.0\.0\.1:%s(/[a-z]+)", command[-1])
    assert paths == ["/readyz"]
    assert "BPRR_PORT" in command[-1]
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'bprr.db'}"), background=False)
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
        assert "get" in schema["paths"][paths[0]]
        ready = client.get(paths[0])
        assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_database_urls_use_a_driver_the_app_opens() -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    urls = {
        "Dockerfile": docker_env()["BPRR_DATABASE_URL"],
        "docker-compose.yml": interpolate(coordinator_env()["BPRR_DATABASE_URL"]),
    }
    for source, raw in urls.items():
        url = make_url(raw)
        assert url.drivername in ACCEPTED_DRIVERS, f"{source}: {url.drivername}"
        url.get_dialect()  # the driver (psycopg 3 or sqlite3) is installed with the app
    sqlite_path = make_url(urls["Dockerfile"]).database or ""
    assert sqlite_path.startswith("/data/")  # the image's volume, writable by its user
    assert any(keyword == "VOLUME" and "/data" in rest for keyword, rest in last_stage()), (
        "the SQLite default needs the /data volume"
    )
    pg = make_url(urls["docker-compose.yml"])
    assert pg.host == "postgres" and pg.host in services and pg.port == 5432
    pg_env = {k: interpolate(str(v)) for k, v in postgres["environment"].items()}
    assert pg.username == pg_env["POSTGRES_USER"]
    assert pg.password == pg_env["POSTGRES_PASSWORD"]
    assert pg.database == pg_env["POSTGRES_DB"]


def test_postgres_is_healthy_before_the_coordinator_starts() -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    test = postgres["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "pg_isready" in test[1]
    coordinator = services["coordinator"]
    assert coordinator["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert coordinator["build"] == "."


def test_the_image_migrates_then_serves_as_a_non_root_user() -> None:
    steps = instructions()
    images = [rest.split()[0] for keyword, rest in steps if keyword == "FROM"]
    assert images and all(image == "python:3.11-slim" for image in images)
    final = last_stage()
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert any(
        keyword == "RUN" and "useradd" in rest and users[-1] in rest for keyword, rest in final
    )
    installs = [rest for keyword, rest in final if keyword == "RUN" and "pip install" in rest]
    assert installs and all(" -e " not in rest and ".whl" in rest for rest in installs)
    (cmd,) = [rest for keyword, rest in final if keyword == "CMD"]
    shell = exec_form(cmd)[-1]
    assert shell.index("alembic upgrade head") < shell.index("bprr serve")
    assert "&&" in shell  # the server does not start when the migration fails
    # alembic.ini and migrations/ sit in the working directory the command runs in.
    workdirs = [rest for keyword, rest in final if keyword == "WORKDIR"]
    copied = {
        rest.split()[0] for keyword, rest in final if keyword == "COPY" and "--from" not in rest
    }
    assert workdirs and {"alembic.ini", "migrations"} <= copied
    # Every COPY source exists in the repository (and is not excluded by .dockerignore).
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for keyword, rest in steps:
        if keyword == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists() and source not in ignored, source
    assert ".venv" in ignored and ".git" in ignored
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'bprr = "app.cli:main"' in scripts


def test_serve_is_a_command_of_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--port" in result.stdout and "--host" in result.stdout


@pytest.mark.slow
def test_a_wheel_carries_the_dashboard(tmp_path: Path) -> None:
    """What the image installs: a non-editable wheel, with app/api/static inside."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("bprr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = {f"app/api/static/{p.name}" for p in (ROOT / "app/api/static").iterdir()}
    assert static and static <= names
    assert "app/api/dashboard.py" in names and "app/py.typed" in names
