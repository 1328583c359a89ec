#!/usr/bin/env bash
# Side-by-side benchmark: Outpost vs Debian's docker-registry (distribution 2.8) on the same
# machine, same data, same client, in one run. Prints a table with ratios (Outpost / peer).
#
#   bench/run.sh                 # full run (1 GiB blob, 200 x 1 MiB, 32/128 clients, 10k tags)
#   BENCH_QUICK=1 bench/run.sh   # smaller sizes, for a smoke run
#
# Needs: cargo, docker-registry, wrk, iperf3, python3 (tests/deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p outpost -p outpost-bench >&2
OUTPOST=$PWD/target/release/outpost
BENCH=$PWD/target/release/outpost-bench
for c in docker-registry wrk iperf3 python3; do
    command -v "$c" >/dev/null || { echo "bench/run.sh: $c is missing; run tests/deps.sh as root" >&2; exit 1; }
done

if [ "${BENCH_QUICK:-0}" = 1 ]; then
    BIG=$((64 << 20)); LAYERS=40; TAGS=1000; WRK_SECS=3; ROUNDS32=2; ROUNDS128=1
else
    BIG=$((1 << 30)); LAYERS=200; TAGS=10000; WRK_SECS=10; ROUNDS32=4; ROUNDS128=2
fi

work=$(mktemp -d /tmp/outpost-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
rss_parts() { awk '/^(VmRSS|RssAnon|RssFile):/ {printf "%s ", $2}' "/proc/$1/status"; } # KiB: total anon file
# any HTTP answer counts: with credentials configured, Outpost challenges `GET /v2/` with 401
wait_up() { for _ in $(seq 100); do curl -s -o /dev/null "$1/v2/" && return 0; sleep 0.1; done; echo "server at $1 did not start" >&2; exit 1; }

# ---- servers ----
OP_PORT=$(free_port); DR_PORT=$(free_port)
mkdir -p "$work/outpost" "$work/dr"
# Anonymous pull on, so the main comparison is like for like with the unauthenticated peer;
# pushes use the admin token, and the auth section below measures what credentials cost.
OP_PW=bench-admin-password
OP_AUTH="Basic $(printf 'admin:%s' "$OP_PW" | base64 -w0)"
OUTPOST_ADMIN_PASSWORD=$OP_PW OUTPOST_ANONYMOUS_PULL=true \
    "$OUTPOST" serve --listen 127.0.0.1:$OP_PORT --data-dir "$work/outpost" --log-level warn 2>"$work/outpost.log" &
pids+=($!); OP_PID=$!
cat >"$work/dr.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/dr
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$DR_PORT
YML
env -u REGISTRY_AUTH_FILE docker-registry serve "$work/dr.yml" 2>"$work/dr.log" &
pids+=($!); DR_PID=$!
wait_up "http://127.0.0.1:$OP_PORT"; wait_up "http://127.0.0.1:$DR_PORT"
sleep 1

results=$work/results.jsonl
record() { # name server json
    printf '{"name":"%s","server":"%s","r":%s}\n' "$1" "$2" "$3" >>"$results"
}

# ---- ceiling: iperf3 over loopback ----
IP_PORT=$(free_port)
iperf3 -s -1 -p "$IP_PORT" >/dev/null 2>&1 &
sleep 0.5
iperf=$(iperf3 -c 127.0.0.1 -p "$IP_PORT" -t 5 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/8e6)')
record iperf3 loopback "{\"mb_s\":$iperf}"
echo "iperf3 loopback single stream: $iperf MB/s" >&2

for server in outpost docker-registry; do
    if [ "$server" = outpost ]; then URL=http://127.0.0.1:$OP_PORT; PID=$OP_PID; else URL=http://127.0.0.1:$DR_PORT; PID=$DR_PID; fi
    B=("$BENCH" --registry "$URL")
    W=()   # pushes to Outpost need the admin token
    [ "$server" = outpost ] && W=(--auth "$OP_AUTH")
    echo "== $server" >&2
    record idle_rss "$server" "{\"rss_mib\":$(( $(rss_kib $PID) / 1024 ))}"

    out=$("${B[@]}" "${W[@]}" push-blob --repo big/blob --size $BIG); record push_1g "$server" "$out"; echo "$out" >&2
    dig=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["digest"])')
    [ "$server" = outpost ] && big_op=$dig
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    out=$("${B[@]}" pull-blob --repo big/blob --digest "$dig"); record pull_1g_cold "$server" "$out"; echo "$out" >&2
    # warm: the median of 5 pulls in a row (a single ~0.3 s transfer varies by ±10%; iperf3 runs 5 s)
    out=$("${B[@]}" pull-blob --repo big/blob --digest "$dig" --repeat 5); record pull_1g "$server" "$out"; echo "$out" >&2

    out=$("${B[@]}" "${W[@]}" push-image --repo img/one --tag v1 --layers $LAYERS --layer-size $((1 << 20)) --concurrency 1 --seed 11); record push_200x1m_c1 "$server" "$out"; echo "$out" >&2
    out=$("${B[@]}" "${W[@]}" push-image --repo img/six --tag v1 --layers $LAYERS --layer-size $((1 << 20)) --concurrency 6 --seed 12); record push_200x1m_c6 "$server" "$out"; echo "$out" >&2
    out=$("${B[@]}" pull-image --repo img/one --tag v1 --concurrency 1); record pull_200x1m_c1 "$server" "$out"; echo "$out" >&2
    out=$("${B[@]}" pull-image --repo img/six --tag v1 --concurrency 6); record pull_200x1m_c6 "$server" "$out"; echo "$out" >&2

    out=$("${B[@]}" "${W[@]}" push-blob --repo hot/blob --size $((16 << 20)) --seed 5)
    hot=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["digest"])')
    [ "$server" = outpost ] && hot_op=$hot
    out=$("${B[@]}" pull-concurrent --repo hot/blob --digest "$hot" --clients 32 --rounds $ROUNDS32); record pull16m_32 "$server" "$out"; echo "$out" >&2
    # sample RSS while 128 clients pull; keep the heap (RssAnon) / mapped files (RssFile) split
    before=$(rss_kib "$PID")
    ( peak=0; while kill -0 "$PID" 2>/dev/null; do set -- $(rss_parts "$PID"); [ "$1" -gt "$peak" ] && peak=$1 && echo "$*" >"$work/peak"; sleep 0.05; done ) &
    sampler=$!
    out=$("${B[@]}" pull-concurrent --repo hot/blob --digest "$hot" --clients 128 --rounds $ROUNDS128); record pull16m_128 "$server" "$out"; echo "$out" >&2
    kill $sampler 2>/dev/null || true; wait $sampler 2>/dev/null || true
    read -r peak anon file <"$work/peak"
    record rss_128 "$server" "{\"rss_mib\":$((peak / 1024)),\"anon_mib\":$((anon / 1024)),\"file_mib\":$((file / 1024)),\"before_mib\":$((before / 1024))}"

    # manifest GET by tag, 32 connections
    wrk_out=$(wrk -t2 -c32 -d${WRK_SECS}s --latency -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$URL/v2/img/one/manifests/v1")
    rps=$(echo "$wrk_out" | awk '/Requests\/sec/ {print $2}')
    p99=$(echo "$wrk_out" | awk '$1=="99%" {print $2}' | python3 -c 'import sys; s=sys.stdin.read().strip(); u={"us":1e-3,"ms":1,"s":1e3}; n=s.rstrip("usm"); unit=s[len(n):]; print(float(n)*u[unit])')
    errs=$(echo "$wrk_out" | grep -c 'Non-2xx' || true)
    record manifest_get "$server" "{\"rps\":$rps,\"p99_ms\":$p99,\"non2xx_lines\":$errs}"
    echo "manifest GET: $rps req/s, p99 $p99 ms" >&2

    out=$("${B[@]}" "${W[@]}" seed-tags --repo img/one --tag v1 --count $TAGS); record seed_tags "$server" "$out"; echo "$out" >&2
    out=$("${B[@]}" tags-list --repo img/one --rounds 20); record tags_list "$server" "$out"; echo "$out" >&2
done

# ---- what authentication costs (Outpost only, same run) ----
URL=http://127.0.0.1:$OP_PORT
bearer=$(curl -sf -u "admin:$OP_PW" "$URL/oauth2/token?service=outpost&scope=repository:img/one:pull&scope=repository:hot/blob:pull&scope=repository:big/blob:pull" | python3 -c 'import json,sys; print("Bearer "+json.load(sys.stdin)["token"])')
"$BENCH" --registry "$URL" pull-blob --repo big/blob --digest "$big_op" >/dev/null  # warm the page cache
for mode in anonymous basic bearer; do
    case $mode in anonymous) A=();; basic) A=(--auth "$OP_AUTH");; bearer) A=(--auth "$bearer");; esac
    H=(); [ $mode != anonymous ] && H=(-H "Authorization: ${A[1]}")
    wrk_out=$(wrk -t2 -c32 -d${WRK_SECS}s --latency -H 'Accept: application/vnd.oci.image.manifest.v1+json' "${H[@]}" "$URL/v2/img/one/manifests/v1")
    rps=$(echo "$wrk_out" | awk '/Requests\/sec/ {print $2}')
    non2xx=$(echo "$wrk_out" | awk '/Non-2xx/ {print $5}'); non2xx=${non2xx:-0}
    record "auth_manifest_$mode" outpost "{\"rps\":$rps,\"non2xx\":$non2xx}"
    out=$("$BENCH" --registry "$URL" "${A[@]}" pull-concurrent --repo hot/blob --digest "$hot_op" --clients 32 --rounds $ROUNDS32); record "auth_pull32_$mode" outpost "$out"
    out=$("$BENCH" --registry "$URL" "${A[@]}" pull-blob --repo big/blob --digest "$big_op" --repeat 3); record "auth_pull1_$mode" outpost "$out"
    echo "auth $mode: manifest $rps req/s (non-2xx $non2xx)" >&2
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
get = lambda n, s, k: next((r["r"][k] for r in rows if r["name"] == n and r["server"] == s), None)
metrics = [
    ("push 1 GiB blob, 1 stream (MB/s)", "push_1g", "mb_s", True),
    ("pull 1 GiB blob, 1 stream, cold cache (MB/s)", "pull_1g_cold", "mb_s", True),
    ("pull 1 GiB blob, 1 stream, warm, median of 5 (MB/s)", "pull_1g", "mb_s", True),
    ("push 200 x 1 MiB, 1 stream (MB/s)", "push_200x1m_c1", "mb_s", True),
    ("push 200 x 1 MiB, 6 streams (MB/s)", "push_200x1m_c6", "mb_s", True),
    ("pull 200 x 1 MiB, 1 stream (MB/s)", "pull_200x1m_c1", "mb_s", True),
    ("pull 200 x 1 MiB, 6 streams (MB/s)", "pull_200x1m_c6", "mb_s", True),
    ("32 clients pull 16 MiB (MB/s)", "pull16m_32", "mb_s", True),
    ("32 clients pull 16 MiB, p99 (ms)", "pull16m_32", "p99_ms", False),
    ("128 clients pull 16 MiB (MB/s)", "pull16m_128", "mb_s", True),
    ("128 clients pull 16 MiB, p99 (ms)", "pull16m_128", "p99_ms", False),
    ("RSS under 128 clients (MiB)", "rss_128", "rss_mib", False),
    ("RSS idle (MiB)", "idle_rss", "rss_mib", False),
    ("manifest GET by tag, 32 conns (req/s)", "manifest_get", "rps", True),
    ("manifest GET by tag, p99 (ms)", "manifest_get", "p99_ms", False),
    ("tags list of 10k tags, p50 (ms)", "tags_list", "p50_ms", False),
    ("tags list of 10k tags, p99 (ms)", "tags_list", "p99_ms", False),
]
ip = get("iperf3", "loopback", "mb_s")
print(f"iperf3 loopback single stream: {ip:.0f} MB/s\n")
print(f"| {'metric':52} | {'outpost':>10} | {'docker-registry':>15} | {'ratio':>7} |")
print(f"|{'-'*54}|{'-'*12}|{'-'*17}|{'-'*9}|")
for label, name, key, higher in metrics:
    a, b = get(name, "outpost", key), get(name, "docker-registry", key)
    if a is None or b is None:
        continue
    ratio = (a / b) if b else float("inf")
    print(f"| {label:52} | {a:10.1f} | {b:15.1f} | {ratio:6.2f}x |")
print("\nRSS at the 128-client peak, split (MiB): ", end="")
print("; ".join(f"{srv}: {get('rss_128', srv, 'anon_mib')} heap (RssAnon) + {get('rss_128', srv, 'file_mib')} "
                f"mapped files (RssFile), {get('rss_128', srv, 'before_mib')} just before the run"
                for srv in ("outpost", "docker-registry")))
a = get("pull_1g", "outpost", "mb_s")
print(f"\nOutpost single-stream pull vs iperf3: {100*a/ip:.0f}%")
print(f"\n| {'Outpost with credentials':52} | {'anonymous':>10} | {'basic':>10} | {'bearer':>10} | {'worst/anon':>10} |")
print(f"|{'-'*54}|{'-'*12}|{'-'*12}|{'-'*12}|{'-'*12}|")
for label, name, key in [("manifest GET by tag, 32 conns (req/s)", "auth_manifest", "rps"),
                         ("32 clients pull 16 MiB (MB/s)", "auth_pull32", "mb_s"),
                         ("pull 1 GiB blob, 1 stream, median of 3 (MB/s)", "auth_pull1", "mb_s")]:
    v = [get(f"{name}_{m}", "outpost", key) for m in ("anonymous", "basic", "bearer")]
    if None in v:
        continue
    print(f"| {label:52} | {v[0]:10.1f} | {v[1]:10.1f} | {v[2]:10.1f} | {min(v[1:])/v[0]:9.2f}x |")
bad = [r for r in rows if r["name"].startswith("auth_manifest") and r["r"].get("non2xx")]
if bad:
    print("WARNING: non-2xx answers during the auth runs:", bad)
PY
