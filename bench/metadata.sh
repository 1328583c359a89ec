#!/usr/bin/env bash
# Outpost with its metadata in SQLite (the default) and in PostgreSQL (database_url), same
# binary, same client, one run, rounds alternating: a 200 x 1 MiB image pushed on 1 and on 6
# streams, the tags list of a repository with 10,000 tags, and manifest GETs by tag with wrk
# (32 connections). PostgreSQL is a private server on the same two cores (tests/postgres.sh:
# fsync off, so this compares the servers' work, not the disks').
#
#   bench/metadata.sh            (after cargo build --release and tests/deps.sh)
#   ROUNDS=1 bench/metadata.sh   (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${CARGO_TARGET_DIR:-target}/release
[ -x "$B/outpost-bench" ] || cargo build --release -p outpost -p outpost-bench
T=$(mktemp -d /tmp/outpost-metabench.XXXXXX)
# Its own directory: as root, the server runs as `postgres`, which cannot enter $T (mode 700).
P=$(mktemp -d /tmp/outpost-metabench-pg.XXXXXX)
trap 'tests/postgres.sh stop "$P"; rm -rf "$T" "$P"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
AUTH="Basic $(printf admin:bench | base64)"
PG=$(tests/postgres.sh start "$P")
num() { python3 -c "import json,sys; print(round(json.load(sys.stdin)['$1'], 2))"; }

run() { # label round [environment for outpost serve]
    local label=$1 round=$2 port
    shift 2
    port=$(free_port)
    env "$@" OUTPOST_ADMIN_PASSWORD=bench OUTPOST_LISTEN="127.0.0.1:$port" \
        OUTPOST_DATA_DIR="$T/$label-$round" OUTPOST_ANONYMOUS_PULL=true \
        "$B/outpost" serve >"$T/$label-$round.log" 2>&1 &
    local pid=$!
    until curl -s -o /dev/null "127.0.0.1:$port/v2/"; do sleep 0.1; done
    local o=(--registry "http://127.0.0.1:$port" --auth "$AUTH") c1 c6 tl w
    c1=$("$B/outpost-bench" push-image "${o[@]}" --repo img/one --tag v1 --layers 200 \
        --layer-size 1048576 --concurrency 1 --seed $((round * 2)) | num mb_s)
    c6=$("$B/outpost-bench" push-image "${o[@]}" --repo img/six --tag v1 --layers 200 \
        --layer-size 1048576 --concurrency 6 --seed $((round * 2 + 1)) | num mb_s)
    "$B/outpost-bench" seed-tags "${o[@]}" --repo img/one --tag v1 --count 10000 >/dev/null
    tl=$("$B/outpost-bench" --registry "http://127.0.0.1:$port" tags-list --repo img/one --rounds 20 | num p50_ms)
    w=$(wrk -t2 -c32 -d5s --latency -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        "http://127.0.0.1:$port/v2/img/one/manifests/v1" |
        awk '/Requests\/sec/ {r=$2} / 99% / {p=$2} END {print r, p}')
    printf '| %-10s | %5s | %9s | %9s | %13s | %s |\n' "$label" "$round" "$c1" "$c6" "$tl" "$w"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

echo "| metadata   | round | push c1 MB/s | push c6 MB/s | tags 10k p50 ms | manifest GET req/s, p99 |"
echo "|------------|-------|-----------|-----------|---------------|------------------------|"
for round in $(seq "${ROUNDS:-2}"); do
    run sqlite "$round"
    psql -q "$PG" -c "CREATE DATABASE bench_$round"
    run postgres "$round" OUTPOST_DATABASE_URL="${PG%/postgres}/bench_$round"
done
