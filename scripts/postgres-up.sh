#!/usr/bin/env bash
# Before the tests: start this machine's PostgreSQL cluster when it is down (Debian's
# pg_ctlcluster, as root or the postgres user), then say in one line if the tests still cannot
# reach it (their PostgreSQL tests are then skipped with that reason; everything else runs).
set -uo pipefail
cd "$(dirname "$0")/.."
python="${1:-.venv/bin/python}"
dsn="${BPRR_TEST_PG:-host=127.0.0.1 port=5432 dbname=test}"
if ! "$python" -c "import psycopg" 2>/dev/null; then
  echo "scripts/postgres-up.sh: $python cannot import psycopg (run make test, or give the venv's python)" >&2
  exit 2
fi
# the same check as the tests' (tests/conftest.py): connect to the database they use
probe() { "$python" -c "import psycopg, sys; psycopg.connect(sys.argv[1], connect_timeout=3).close()" "$dsn" 2>/dev/null; }
probe && exit 0
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  for version in $(ls /etc/postgresql); do
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
  done
  for _ in 1 2 3 4 5; do probe && exit 0; sleep 1; done
fi
echo "make test: no PostgreSQL at '$dsn' (trust auth, database test; on Debian: apt-get install postgresql): the tests marked postgres will be skipped"
exit 0
