#!/usr/bin/env bash
# Outpost with blob_store on the test emulators (moto for S3, azurite for Azure Blob Storage)
# against Outpost on local disk, same client, one run: a 256 MiB blob pushed and pulled on one
# stream, and a 50 x 1 MiB image pushed and pulled 4 at a time. The emulators set the pace of
# their rows (moto is Python and reads a whole object for every ranged GET), so this shows that
# the paths work end to end and what they cost here, not what S3 or Azure would do.
#
#   bench/object_store.sh            (after cargo build --release and tests/deps.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${CARGO_TARGET_DIR:-target}/release
[ -x "$B/outpost-bench" ] || cargo build --release -p outpost -p outpost-bench
T=$(mktemp -d /tmp/outpost-objbench.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$T"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
AUTH="Basic $(printf admin:bench | base64)"

run() { # label, then environment for outpost serve
    local label=$1 port
    shift
    port=$(free_port)
    env "$@" OUTPOST_ADMIN_PASSWORD=bench OUTPOST_LISTEN="127.0.0.1:$port" OUTPOST_DATA_DIR="$T/$label" \
        "$B/outpost" serve >"$T/$label.log" 2>&1 &
    local pid=$!
    until curl -s -o /dev/null "127.0.0.1:$port/v2/"; do sleep 0.1; done
    local o=(--registry "http://127.0.0.1:$port" --auth "$AUTH")
    echo "== $label"
    local p
    p=$("$B/outpost-bench" push-blob "${o[@]}" --repo big --size 268435456)
    echo "$p"
    "$B/outpost-bench" pull-blob "${o[@]}" --repo big --repeat 3 \
        --digest "$(echo "$p" | python3 -c 'import json,sys; print(json.load(sys.stdin)["digest"])')"
    "$B/outpost-bench" push-image "${o[@]}" --repo img --tag t --layers 50 --layer-size 1048576 --concurrency 4
    "$B/outpost-bench" pull-image "${o[@]}" --repo img --tag t --concurrency 4
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

s3=$(free_port)
az=$(free_port)
"${MOTO_SERVER:-.venv/bin/moto_server}" -H 127.0.0.1 -p "$s3" >"$T/moto.log" 2>&1 &
pids+=($!)
"${AZURITE_BLOB:-.cache/azurite/node_modules/.bin/azurite-blob}" --blobHost 127.0.0.1 --blobPort "$az" \
    --location "$T/azurite" --skipApiVersionCheck --loose --disableTelemetry >"$T/azurite.log" 2>&1 &
pids+=($!)
until curl -s -o /dev/null "127.0.0.1:$s3" && curl -s -o /dev/null "127.0.0.1:$az"; do sleep 0.2; done
curl -sf -X PUT "http://127.0.0.1:$s3/bench" >/dev/null
python3 tests/process/azurite.py create "$az" bench

run local
run s3 AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 \
    AWS_ENDPOINT="http://127.0.0.1:$s3" AWS_ALLOW_HTTP=true OUTPOST_BLOB_STORE=s3://bench/outpost
run azure AZURE_STORAGE_USE_EMULATOR=true AZURITE_BLOB_STORAGE_URL="http://127.0.0.1:$az" \
    OUTPOST_BLOB_STORE=az://bench/outpost
