#!/usr/bin/env bash
# The README's "Walk-through with curl", runnable: a coordinator on a free port with a fresh
# SQLite file in a temporary directory, then the operator's, the servers' and a client's
# calls in order, each printed with its HTTP status and reply. Tokens are captured from the
# replies with python3; everything (the coordinator, the directory) is removed on exit.
#
#   docs/walkthrough.sh                 # from the repository root (uses .venv/bin/bprr)
#   BPRR_BIN=bprr PORT=8099 docs/walkthrough.sh
#   KEEP_RUNNING=1 docs/walkthrough.sh  # leave the coordinator up for more curl (Ctrl-C ends)
#
# Leases last an hour here (BPRR_LEASE_TTL_S), so a person can run the calls one by one at
# their own pace without a server's lease expiring between two steps. The planner thread is
# off (BPRR_PLANNER_INTERVAL_S=0): nothing moves unless a step asks for it.
# Kept true by tests/docs/test_walkthrough.py.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BPRR_BIN=${BPRR_BIN:-$ROOT/.venv/bin/bprr}
PYTHON=${PYTHON:-python3}
ADMIN=secret
JOIN=join

if ! command -v "$BPRR_BIN" >/dev/null 2>&1; then
  echo "error: $BPRR_BIN not found (run make, or set BPRR_BIN to the bprr command)" >&2
  exit 2
fi
for tool in curl "$PYTHON"; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is needed" >&2; exit 2; }
done

WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/bprr-walkthrough.XXXXXX")
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORKDIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# field EXPR: a value computed from the last JSON reply `r` (python3; jq may be missing).
field() {
  "$PYTHON" -c 'import json, sys; r = json.loads(sys.argv[2]); print(eval(sys.argv[1]))' \
    "$1" "$REPLY_BODY"
}

PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL=http://127.0.0.1:$PORT

echo "## 0. a coordinator with an admin and a join token, leases of an hour, planner off"
echo "   BPRR_ADMIN_TOKEN=$ADMIN BPRR_JOIN_TOKEN=$JOIN BPRR_LEASE_TTL_S=3600 \\"
echo "   BPRR_PLANNER_INTERVAL_S=0 bprr serve --port $PORT --database-url sqlite:///$WORKDIR/walkthrough.db"
BPRR_ADMIN_TOKEN=$ADMIN BPRR_JOIN_TOKEN=$JOIN BPRR_DEV_MODE=false \
  BPRR_LEASE_TTL_S=3600 BPRR_HEARTBEAT_INTERVAL_S=60 BPRR_PLANNER_INTERVAL_S=0 \
  "$BPRR_BIN" serve --host 127.0.0.1 --port "$PORT" \
  --database-url "sqlite:///$WORKDIR/walkthrough.db" >"$WORKDIR/serve.log" 2>&1 &
SERVER_PID=$!
# A first start (imports, migrations) can take half a minute on a busy machine.
deadline=$((SECONDS + ${STARTUP_TIMEOUT_S:-180}))
while [ "$SECONDS" -lt "$deadline" ]; do
  if curl -fsS -o /dev/null "$URL/readyz" 2>/dev/null; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "error: bprr serve exited:" >&2
    cat "$WORKDIR/serve.log" >&2
    exit 1
  fi
  sleep 0.1
done
curl -fsS -o /dev/null "$URL/readyz" || { echo "error: the coordinator is not ready" >&2; exit 1; }
echo "   listening on $URL (pid $SERVER_PID)"

# call METHOD PATH [curl options...]: prints the call, "-> HTTP <status>" and the reply (one
# line of JSON); the reply is kept in $REPLY_BODY and the status in $REPLY_STATUS.
call() {
  local method=$1 path=$2
  shift 2
  echo "\$ curl -X $method $path"
  REPLY_STATUS=$(curl -sS -o "$WORKDIR/reply" -w '%{http_code}' -X "$method" "$URL$path" "$@")
  REPLY_BODY=$(cat "$WORKDIR/reply")
  echo "-> HTTP $REPLY_STATUS"
  if [ -n "$REPLY_BODY" ]; then echo "$REPLY_BODY"; fi
}
# expect STATUS: stop the walk-through when the last call did not answer STATUS.
expect() {
  if [ "$REPLY_STATUS" != "$1" ]; then
    echo "error: expected HTTP $1, got $REPLY_STATUS" >&2
    exit 1
  fi
}
JSON=(-H 'Content-Type: application/json')

echo
echo "## 1. the operator sets the model (BLOOM-176B in NF4, 20 tokens in, 128 out)"
call PUT /v1/model -H "Authorization: Bearer $ADMIN" "${JSON[@]}" -d '{"name": "bloom-176b",
  "num_blocks": 70, "block_memory_gb": 1.3234, "kv_bytes_per_token_per_block": 57344,
  "max_input_tokens": 20, "max_output_tokens": 128, "overheads": {"per_token_ms": 100}}'
expect 200

echo
echo "## 2. two GPU servers register with the join token; each gets an id and its own token"
call POST /v1/servers -H "Authorization: Bearer $JOIN" "${JSON[@]}" -d '{"id": "a100-0",
  "site": "eu", "gpu": "A100-80GB", "memory_gb": 86.13, "decode_ms_per_block": 3.22,
  "prefill_ms_per_block": {"fixed": 33, "per_token": 0.074}, "address": "10.0.0.5:31337",
  "boot_epoch": 1}'
expect 201
T0=$(field 'r["token"]')
call POST /v1/servers -H "Authorization: Bearer $JOIN" "${JSON[@]}" -d '{"id": "a100-1",
  "site": "us", "gpu": "A100-80GB", "memory_gb": 86.13, "decode_ms_per_block": 3.22,
  "address": "10.0.1.7:31337", "boot_epoch": 1}'
expect 201
T1=$(field 'r["token"]')
echo "   server tokens: a100-0 $T0, a100-1 $T1"

echo
echo "## 3. RTTs between sites (bulk, EWMA-smoothed; servers can also send theirs in heartbeats)"
call PUT /v1/rtts -H "Authorization: Bearer $ADMIN" "${JSON[@]}" -d '{"entries": [
  {"a": "eu", "b": "us", "rtt_ms": 90}, {"a": "eu", "b": "eu", "rtt_ms": 5},
  {"a": "us", "b": "us", "rtt_ms": 5}]}'
expect 200

echo
echo "## 4. publish a placement; it is generation 1"
echo "   (algorithm auto by default, or chains, cg, milp, petals; here CG-BPRR for |R| = 8)"
call POST /v1/placements -H "Authorization: Bearer $ADMIN" "${JSON[@]}" \
  -d '{"algorithm": "cg", "concurrency": 8}'
expect 201
echo "   generation $(field 'r["generation"]'): spans $(field '", ".join(
  "%s [%d, %d)" % (s["server_id"], s["start"], s["end"]) for s in r["spans"])'); objective\
 $(field 'r["objective_ms_per_token"]') ms/token, bound $(field 'r["bound_ms_per_token"]')"
span_of() { field '"%d %d" % next((s["start"], s["end"]) for s in r["spans"] if s["server_id"] == "'"$1"'")'; }
read -r START0 END0 <<<"$(span_of a100-0)"
read -r START1 END1 <<<"$(span_of a100-1)"

echo
echo "## 5. each server loads its span and heartbeats with its own token (the reply repeats the span)"
call POST /v1/servers/a100-0/heartbeat -H "Authorization: Bearer $T0" "${JSON[@]}" \
  -d "{\"boot_epoch\": 1, \"state\": \"online\", \"loaded_span\": {\"start\": $START0, \"end\": $END0}}"
expect 200
call POST /v1/servers/a100-1/heartbeat -H "Authorization: Bearer $T1" "${JSON[@]}" \
  -d "{\"boot_epoch\": 1, \"state\": \"online\", \"loaded_span\": {\"start\": $START1, \"end\": $END1}}"
expect 200
echo "   (a heartbeat with the other server's token:)"
call POST /v1/servers/a100-1/heartbeat -H "Authorization: Bearer $T0" "${JSON[@]}" \
  -d '{"boot_epoch": 1, "state": "online"}'
expect 403

echo
echo "## 6. a client in site eu asks for a route (read-only), then books a session (reserves cache)"
call GET '/v1/routes?client_site=eu&input_tokens=20&output_tokens=64'
expect 200
echo "   hops $(field '" then ".join(
  "%s [%d, %d)" % (h["server_id"], h["start"], h["end"]) for h in r["hops"])'); first_token_ms\
 $(field 'r["first_token_ms"]'), per_token_ms $(field 'r["per_token_ms"]')"
call POST /v1/sessions "${JSON[@]}" -d '{"client_site": "eu", "input_tokens": 20, "output_tokens": 64}'
expect 201
SESSION=$(field 'r["id"]')
SESSION_TOKEN=$(field 'r["token"]')
echo "   session $SESSION, its token $SESSION_TOKEN (returned once)"

echo
echo "## 7. the client ends its session with the session's token (without it: 401)"
call DELETE "/v1/sessions/$SESSION"
expect 401
call DELETE "/v1/sessions/$SESSION" -H "Authorization: Bearer $SESSION_TOKEN"
expect 204
call GET "/v1/sessions/$SESSION" -H "Authorization: Bearer $SESSION_TOKEN"
expect 200

echo
echo "## 8. what-if: the live swarm and the load it measured, replayed offline"
echo "   (the export carries the measured workload once it has seen 10 bookings in 5 minutes)"
booked=""
for i in $(seq 1 12); do
  status=$(curl -sS -o /dev/null -w '%{http_code}' -X POST "$URL/v1/sessions" "${JSON[@]}" \
    -d "{\"client_site\": \"us\", \"input_tokens\": $((2 + 7 * i % 19)), \"output_tokens\": $((8 * (1 + 5 * i % 16)))}")
  booked="$booked $status"
done
echo "   12 more bookings from site us, varied lengths:$booked"
call GET /v1/scenario
expect 200
echo "$REPLY_BODY" >"$WORKDIR/live.json"
echo "   workload: $(field 'r.get("workload")')"
echo "\$ bprr solve live.json"
"$BPRR_BIN" solve "$WORKDIR/live.json"
echo "\$ bprr simulate live.json"
"$BPRR_BIN" simulate "$WORKDIR/live.json"

echo
echo "## 9. bad calls are refused and change nothing"
echo "   an older boot epoch: 409; a bad field: 422 naming it; an admin route without a token:"
echo "   401, checked before the body is read"
call POST /v1/servers/a100-0/heartbeat -H "Authorization: Bearer $T0" "${JSON[@]}" \
  -d '{"boot_epoch": 0, "state": "online"}'
expect 409
call POST /v1/sessions "${JSON[@]}" -d '{"client_site": "eu", "input_tokens": -1, "output_tokens": 64}'
expect 422
call PUT /v1/model "${JSON[@]}" -d '{"num_blocks": "many"}'
expect 401
echo "   (the model and the server are as they were:)"
call GET /v1/model
expect 200
call GET /v1/servers/a100-0
expect 200

if [ -n "${KEEP_RUNNING:-}" ]; then
  echo
  echo "the coordinator stays up at $URL (admin token $ADMIN); Ctrl-C ends it"
  wait "$SERVER_PID"
fi
echo
echo "walk-through done"
