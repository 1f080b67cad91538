"""The coordinator's HTTP API (FastAPI): thin routes over app.service."""
