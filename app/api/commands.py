"""``bprr serve``: run the coordinator (uvicorn) on the configured database; ``bprr serve
--demo SCENARIO`` runs it with a simulated swarm and client stream (app.demo)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from app.settings import Settings


def register(cli: typer.Typer) -> None:
    @cli.command("serve")
    def serve(
        host: Annotated[str | None, typer.Option(help="Address to bind (BPRR_HOST).")] = None,
        port: Annotated[int | None, typer.Option(help="Port (BPRR_PORT).")] = None,
        database_url: Annotated[
            str | None,
            typer.Option(
                "--database-url",
                help="SQLAlchemy URL (BPRR_DATABASE_URL); default: SQLite file bprr.db.",
            ),
        ] = None,
        workers: Annotated[int, typer.Option(help="Coordinator processes (PostgreSQL).")] = 1,
        demo: Annotated[
            Path | None,
            typer.Option(
                "--demo",
                metavar="SCENARIO",
                help="Live demo: a fresh SQLite coordinator, one simulated server agent per "
                "server of SCENARIO and a Poisson stream of clients (needs bprr_client).",
            ),
        ] = None,
        demo_speed: Annotated[
            float,
            typer.Option(
                "--demo-speed",
                help="Demo time compression: arrivals x SPEED, session durations / SPEED.",
            ),
        ] = 1.0,
        demo_seed: Annotated[
            int | None,
            typer.Option("--demo-seed", help="Demo random seed (default: the scenario's)."),
        ] = None,
    ) -> None:
        """Start the coordinator: REST API, leases, placements, routes and sessions."""
        if demo is not None:
            _serve_demo(demo, host, port, database_url, workers, demo_speed, demo_seed)
            return
        import uvicorn

        from app.cli import UserError
        from app.store.db import SchemaBehindError, ensure_schema, make_engine

        if database_url is not None:
            os.environ["BPRR_DATABASE_URL"] = database_url
        settings = _settings()
        if workers < 1:
            raise UserError("--workers: must be at least 1")
        if port is not None and not 0 <= port <= 65535:
            raise UserError("--port: must be between 0 and 65535")
        if workers > 1 and settings.database_url.startswith("sqlite"):
            raise UserError("--workers: several processes need PostgreSQL (BPRR_DATABASE_URL)")
        engine = make_engine(settings.database_url)
        try:
            ensure_schema(engine, settings.auto_migrate)
        except SchemaBehindError as error:
            raise UserError(str(error)) from None
        except Exception as error:
            raise UserError(
                f"cannot open the database {engine.url.render_as_string(hide_password=True)}: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            ) from None
        finally:
            engine.dispose()
        from app.api.server import uvicorn_options

        uvicorn.run(
            "app.api.app:create_app",
            factory=True,
            host=host or settings.host,
            port=settings.port if port is None else port,
            workers=workers,
            log_level="warning",
            access_log=False,
            **uvicorn_options(settings),
        )


def _settings() -> Settings:
    """The settings from the environment; a bad value is one line naming its variable."""
    from pydantic import ValidationError

    from app.cli import UserError
    from app.settings import Settings

    try:
        return Settings()
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise UserError(f"BPRR_{field.upper()}: {first['msg']}") from None


def _serve_demo(
    scenario: Path,
    host: str | None,
    port: int | None,
    database_url: str | None,
    workers: int,
    speed: float,
    seed: int | None,
) -> None:
    from app.cli import UserError

    if database_url is not None:
        raise UserError("--database-url: the demo runs on its own fresh SQLite file")
    if workers != 1:
        raise UserError("--workers: the demo runs one coordinator process")
    if port is not None and not 0 <= port <= 65535:
        raise UserError("--port: must be between 0 and 65535")
    if not speed > 0 or speed == float("inf"):
        raise UserError(f"--demo-speed: must be a positive number, got {speed}")
    try:
        from app.demo.runner import Demo, DemoError, DemoOptions
    except ImportError as error:
        if (error.name or "").startswith("bprr_client"):
            raise UserError(
                "--demo needs the client package bprr_client: pip install -e clients/python"
            ) from None
        raise
    settings = _settings()
    options = DemoOptions(
        scenario_path=scenario,
        host=host or settings.host,
        port=settings.port if port is None else port,
        speed=speed,
        seed=seed,
    )
    try:
        Demo(options, settings).run()
    except DemoError as error:
        raise UserError(str(error)) from None
