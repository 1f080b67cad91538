"""``bprr serve``: run the coordinator (uvicorn) on the configured database; ``bprr serve
--demo SCENARIO`` runs it with a simulated swarm and client stream (the harness's demo, found
through entry point ``bprr.demo``: app/plugins.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import uvicorn

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
        from app.cli_style import UserError
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

        config = uvicorn.Config(
            "app.api.app:create_app",
            factory=True,
            host=host or settings.host,
            port=settings.port if port is None else port,
            workers=workers,
            log_level="warning",
            access_log=False,
            **uvicorn_options(settings),
        )
        database = make_engine(settings.database_url).url.render_as_string(hide_password=True)
        # bound here (not by uvicorn) so that a busy port is one error line, not a log record
        sock = _bind(config.host, config.port)
        if workers == 1:
            _AnnouncingServer(config, database).run(sockets=[sock])
            return
        from uvicorn.supervisors import Multiprocess

        _announce(f"http://{_url_host(config.host)}:{sock.getsockname()[1]}", database, workers)
        Multiprocess(config, sockets=[sock]).run()


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (as uvicorn binds: SO_REUSEADDR)."""
    from app.cli_style import UserError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise UserError(f"--host: cannot resolve {host!r}: {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise UserError(f"--port: cannot listen on {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)  # the workers (Multiprocess) inherit it
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _announce(url: str, database: str, workers: int = 1) -> None:
    """The one line an operator waits for (uvicorn's own start-up logs are off)."""
    processes = f", {workers} processes" if workers > 1 else ""
    typer.echo(
        f"bprr coordinator listening on {url} (dashboard {url}/, API docs {url}/docs; "
        f"database {database}{processes}); Ctrl-C stops",
        err=True,
    )


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that says where it listens once its socket is bound (port 0 gives
    the port the kernel chose)."""

    def __init__(self, config: uvicorn.Config, database: str) -> None:
        super().__init__(config)
        self.database = database

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:  # start-up failed; uvicorn has said why
            return
        for server in self.servers:
            for bound in server.sockets:
                port = bound.getsockname()[1]
                _announce(f"http://{_url_host(self.config.host)}:{port}", self.database)
                return


def _settings() -> Settings:
    """The settings from the environment; a bad value is one line naming its variable."""
    from pydantic import ValidationError

    from app.cli_style import UserError
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
    from app.cli_style import UserError

    if database_url is not None:
        raise UserError("--database-url: the demo runs on its own fresh SQLite file")
    if workers != 1:
        raise UserError("--workers: the demo runs one coordinator process")
    if port is not None and not 0 <= port <= 65535:
        raise UserError("--port: must be between 0 and 65535")
    if not speed > 0 or speed == float("inf"):
        raise UserError(f"--demo-speed: must be a positive number, got {speed}")
    from app.plugins import DEMO_GROUP, load_hook

    serve_demo = load_hook(DEMO_GROUP, "demo", "--demo")  # the harness's, by entry point
    settings = _settings()
    port = settings.port if port is None else port
    serve_demo(
        scenario, host=host or settings.host, port=port, speed=speed, seed=seed, settings=settings
    )
