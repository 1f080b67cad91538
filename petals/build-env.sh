#!/usr/bin/env bash
# Build the PETALS environment (default .venv-petals) from the package registries only:
#   - hivemind 1.1.10.post2 (what petals 2.2 pins) from its PyPI sdist, with the p2pd binary
#     of the hivemind 1.1.12 wheel (the sdist's build would download p2pd from elsewhere) and
#     the torch>=2.3 GradScaler import fix of later hivemind releases;
#   - everything else from petals/requirements.txt (pinned), then bprr_client (no deps).
# Cached: a stamp keyed on the hash of this script and the requirements; a second run with
# nothing changed exits at once.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# The environment lives in a cache outside the checkout, keyed on its inputs, so a fresh clone
# on the same machine (CI) reuses it; .venv-petals in the checkout is a link to it.
# PETALS_VENV=DIR builds into DIR instead, with no link.
CACHE="${BPRR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bprr}"
LINK=""
PYTHON="${PYTHON:-python3}"
REQ="$ROOT/petals/requirements.txt"
BUILD_REQ="$ROOT/petals/build-requirements.txt"
KEY="$(cat "$0" "$REQ" "$BUILD_REQ" "$ROOT/clients/python/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -n "${PETALS_VENV:-}" ]; then
  VENV="$PETALS_VENV"
else
  VENV="$CACHE/petals-$KEY"
  LINK="$ROOT/.venv-petals"
fi
STAMP="$VENV/.built-$KEY"
link_and_point() {
  if [ -n "$LINK" ]; then
    if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then rm -rf "$LINK"; fi
    ln -sfn "$VENV" "$LINK"
  fi
  # bprr_client is installed editable: point it at this checkout (a cached environment may
  # have been built from another clone).
  here="$("$VENV/bin/python" -P -c 'import bprr_client, os; print(os.path.dirname(os.path.dirname(bprr_client.__file__)))' 2>/dev/null || true)"
  if [ "$here" != "$ROOT/clients/python" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
      -e "$ROOT/clients/python" 2> >(grep -v "^WARNING: Location" >&2)
  fi
}
if [ -f "$STAMP" ]; then
  link_and_point
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
started=$(date +%s)
echo "building the PETALS environment in $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" --quiet --disable-pip-version-check)
"${PIP[@]}" install -r "$BUILD_REQ"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"${PIP[@]}" download --no-deps --no-build-isolation --no-binary :all: \
  hivemind==1.1.10.post2 -d "$WORK/sdist" 2> >(grep -v "^WARNING: Location" >&2)
"${PIP[@]}" download --no-deps --only-binary :all: hivemind==1.1.12 -d "$WORK/wheel" \
  2> >(grep -v "^WARNING: Location" >&2)
tar -xzf "$WORK"/sdist/hivemind-1.1.10.post2.tar.gz -C "$WORK"
SRC="$WORK/hivemind-1.1.10.post2"
"$VENV/bin/python" - "$WORK"/wheel/hivemind-1.1.12-*.whl "$SRC" <<'PY'
import hashlib, os, re, sys, zipfile
wheel, src = sys.argv[1], sys.argv[2]
# 1. p2pd from the 1.1.12 wheel (same daemon protocol and flags as 1.1.10's v0.3.18 build)
binary = os.path.join(src, "hivemind", "hivemind_cli", "p2pd")
with zipfile.ZipFile(wheel) as archive, open(binary, "wb") as out:
    out.write(archive.read("hivemind/hivemind_cli/p2pd"))
os.chmod(binary, 0o755)
digest = hashlib.sha256(open(binary, "rb").read()).hexdigest()
setup = os.path.join(src, "setup.py")
text = open(setup).read()
text, n = re.subn(r'("p2pd-linux-amd64": )"[0-9a-f]{64}"', rf'\1"{digest}"', text)
assert n == 1, "setup.py: p2pd hash not found"
open(setup, "w").write(text)
# 2. torch >= 2.3 moved GradScaler out of torch.cuda.amp (petals issue #576)
scaler = os.path.join(src, "hivemind", "optim", "grad_scaler.py")
text = open(scaler).read()
old = ("from torch.cuda.amp import GradScaler as TorchGradScaler\n"
       "from torch.cuda.amp.grad_scaler import OptState, _refresh_per_optimizer_state\n")
new = ("from torch.amp import GradScaler as TorchGradScaler\n"
       "from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state\n")
assert old in text, "grad_scaler.py: import lines not found"
open(scaler, "w").write(text.replace(old, new))
PY
"${PIP[@]}" wheel --no-deps --no-build-isolation "$SRC" -w "$WORK/dist"
"${PIP[@]}" install -r "$REQ" "$WORK"/dist/hivemind-1.1.10.post2-*.whl \
  2> >(grep -v "^WARNING: Location" >&2)
"${PIP[@]}" install --no-deps -e "$ROOT/clients/python"
"$VENV/bin/pip" check
"$VENV/bin/python" -P -c "import petals, bprr_client.swarm"
rm -f "$VENV"/.built-*
touch "$STAMP"
link_and_point
echo "PETALS environment ready in $(( $(date +%s) - started )) s"
