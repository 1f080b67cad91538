# The bprr coordinator image: a non-editable install of the project on python:3.11-slim, run
# as a non-root user; at start it applies the database migrations (alembic upgrade head) and
# runs `bprr serve` on 0.0.0.0:$BPRR_PORT. Settings are BPRR_* variables (app/settings.py);
# docker-compose.yml runs it against PostgreSQL 16.

# --- build: a wheel of the project (the source tree is not in the final image) ---------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- run -----------------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BPRR_HOST=0.0.0.0 \
    BPRR_PORT=8080 \
    BPRR_LOG_JSON=true \
    BPRR_DATABASE_URL=sqlite:////data/bprr.db
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bprr \
    && mkdir -p /data && chown bprr:bprr /data
# The migrations run from here: `alembic upgrade head` reads alembic.ini, and the installed
# package finds migrations/ in its working directory.
WORKDIR /app
COPY alembic.ini ./
COPY migrations ./migrations
USER bprr
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('BPRR_PORT', '8080'), timeout=2)"]
CMD ["sh", "-c", "alembic upgrade head && exec bprr serve"]
