#!/usr/bin/env bash
# Sync benchmark: Outpost's connected registries vs `skopeo sync` between Debian docker-registry
# instances (A -> B plain, A -> C with --preserve-digests), same machine, same shape of data, in
# one run. Prints a table (docs/benchmarks.md, section "Sync", says what each row measures).
#
#   bench/sync.sh                  # full run: 50 repos x 5 tags, 1 GiB blob, 5 push-to-leaf rounds
#   BENCH_QUICK=1 bench/sync.sh    # smaller: 10 repos x 5 tags, 64 MiB blob
#   BENCH_NO_BUILD=1 bench/sync.sh # use target/release/{outpost,outpost-bench} as they are
#
# Needs: cargo, docker-registry, skopeo, curl, python3 (tests/deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${BENCH_NO_BUILD:-0}" = 1 ] || cargo build --release --locked -p outpost -p outpost-bench >&2
OUTPOST=$PWD/target/release/outpost
BENCH=$PWD/target/release/outpost-bench
for c in docker-registry skopeo curl python3; do
    command -v "$c" >/dev/null || { echo "bench/sync.sh: $c is missing; run tests/deps.sh as root" >&2; exit 1; }
done
# Outpost refuses unknown OUTPOST_* variables; hand none of ours down.
for v in $(env | awk -F= '/^OUTPOST_/ {print $1}'); do unset "$v"; done

if [ "${BENCH_QUICK:-0}" = 1 ]; then
    REPOS=10; BIG=$((64 << 20)); ROUNDS=3
else
    REPOS=50; BIG=$((1 << 30)); ROUNDS=5
fi
TAGS=5; LAYERS=2; LAYER_SIZE=$((64 << 10))
POLL=25   # OUTPOST_SYNC_POLL_SECS, the default

work=$(mktemp -d /tmp/outpost-sync-bench.XXXXXX)
shm=$(mktemp -d /dev/shm/outpost-sync-bench.XXXXXX)   # memory-backed: the no-disk row
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work" "$shm"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 200); do curl -s -o /dev/null "$1/v2/" && return 0; sleep 0.05; done; echo "server at $1 did not start" >&2; exit 1; }
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.3f}')" "$1" "$2"; }
jget() { python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1:]: v=v[int(k) if k.isdigit() else k]
print(v)' "$@"; }

results=$work/results.jsonl
record() { printf '{"name":"%s","r":%s}\n' "$1" "$2" >>"$results"; }

ROOT_PW=bench-root-password
SITE_PW=bench-site-password
ROOT_AUTH="Basic $(printf 'admin:%s' "$ROOT_PW" | base64 -w0)"
MT='application/vnd.oci.image.manifest.v1+json'

# Waits run in outpost-bench (one keep-alive connection, polled 1 ms apart), not in a script
# interpreter: starting python3 alone takes ~90 ms here, which would swamp a ~10 ms propagation.
wait_for() { # SINCE URL PASSWORD ARGS...; prints seconds since SINCE
    "$BENCH" --registry "$2" --auth "Basic $(printf 'admin:%s' "$3" | base64 -w0)" wait --since "$1" "${@:4}"
}
tag_digest() { # URL USER:PW REPO TAG
    curl -sf -I -u "$2" -H "Accept: $MT" "$1/v2/$3/manifests/$4" | tr -d '\r' | awk -F': ' 'tolower($1)=="docker-content-digest" {print $2}'
}

start_outpost() { # NAME PORT PASSWORD [connection string]; sets the PID in $last_pid
    # DATA_DIR overrides where the data goes (the tmpfs row of the big-blob test).
    local data=${DATA_DIR:-$work/$1}
    mkdir -p "$data"
    if [ -n "${4:-}" ]; then
        OUTPOST_ADMIN_PASSWORD=$3 OUTPOST_SYNC_POLL_SECS=$POLL \
            "$OUTPOST" serve --listen 127.0.0.1:$2 --data-dir "$data" --log-level warn \
            --connection-string "$4" 2>"$work/$1.log" &
    else
        OUTPOST_ADMIN_PASSWORD=$3 \
            "$OUTPOST" serve --listen 127.0.0.1:$2 --data-dir "$work/$1" --log-level warn 2>"$work/$1.log" &
    fi
    last_pid=$!; pids+=($last_pid)
}
start_dr() { # NAME PORT
    mkdir -p "$work/$1"
    cat >"$work/$1.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/$1
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$2
YML
    env -u REGISTRY_AUTH_FILE docker-registry serve "$work/$1.yml" 2>"$work/$1.log" &
    pids+=($!)
}
cr() { "$OUTPOST" connected-registry "$@" --registry "$ROOT" --username admin --password "$ROOT_PW"; }
settings() { cr get-settings -n "$1" --parent-protocol http --generate-password 1 --yes -o tsv | tr -d '\n'; }

# ---- servers: the Outpost root, docker-registry A (source) and B (destination) ----
# C is a second destination for `skopeo sync --preserve-digests` (copies layers as they are).
ROOT_PORT=$(free_port); A_PORT=$(free_port); B_PORT=$(free_port); C_PORT=$(free_port)
ROOT=http://127.0.0.1:$ROOT_PORT; A=http://127.0.0.1:$A_PORT; B=http://127.0.0.1:$B_PORT; C=http://127.0.0.1:$C_PORT
start_outpost root "$ROOT_PORT" "$ROOT_PW"
start_dr dr-a "$A_PORT"; start_dr dr-b "$B_PORT"; start_dr dr-c "$C_PORT"
wait_up "$ROOT"; wait_up "$A"; wait_up "$B"; wait_up "$C"

# ---- 1. data: REPOS x TAGS distinct images (LAYERS x LAYER_SIZE) on the root and on A ----
repos=(); for i in $(seq 0 $((REPOS - 1))); do repos+=("$(printf 'r%02d' "$i")"); done
echo "== pushing $REPOS x $TAGS images to the Outpost root and to docker-registry A" >&2
push_all() { # URL [--auth HEADER]; 8 pushes in flight
    local url=$1; shift
    local n=0 inflight=()
    for r in "${repos[@]}"; do
        for t in $(seq 1 $TAGS); do
            n=$((n + 1))
            "$BENCH" --registry "$url" "$@" push-image --repo "$r" --tag "t$t" --layers $LAYERS \
                --layer-size $LAYER_SIZE --seed $((1000 + n)) >/dev/null &
            inflight+=($!)
            if [ ${#inflight[@]} -ge 8 ]; then for p in "${inflight[@]}"; do wait "$p"; done; inflight=(); fi
        done
    done
    for p in "${inflight[@]}"; do wait "$p"; done
}
push_all "$ROOT" --auth "$ROOT_AUTH"
push_all "$A"
record data "{\"repos\":$REPOS,\"tags\":$TAGS,\"layers\":$LAYERS,\"layer_size\":$LAYER_SIZE}"

# ---- 2. initial sync ----
echo "== initial sync: Outpost site (--repository '*')" >&2
cr create -n site-all --repository '*' >/dev/null
CS_ALL=$(settings site-all)
SITE_PORT=$(free_port); SITE=http://127.0.0.1:$SITE_PORT
t0=$(now)
start_outpost site-all "$SITE_PORT" "$SITE_PW" "$CS_ALL"
site_all_pid=$last_pid
# repositories in reverse order: the last one in catalog order is usually the last to finish,
# and each wait is monotonic, so the sum ends when all have TAGS tags.
rev=(); for ((i=${#repos[@]}-1; i>=0; i--)); do rev+=("${repos[$i]}"); done
op_init=$(wait_for "$t0" "$SITE" "$SITE_PW" --tags $TAGS --repos "${rev[@]}")
echo "outpost initial: $op_init s" >&2
# verify: every tag at the site has the root's digest
bad=0
for r in "${repos[@]}"; do for t in $(seq 1 $TAGS); do
    [ "$(tag_digest "$SITE" "admin:$SITE_PW" "$r" "t$t")" = "$(tag_digest "$ROOT" "admin:$ROOT_PW" "$r" "t$t")" ] || bad=$((bad + 1))
done; done
record op_initial "{\"secs\":$op_init,\"mismatched_tags\":$bad}"

echo "== initial sync: skopeo sync A -> B" >&2
{
    echo "127.0.0.1:$A_PORT:"
    echo "  tls-verify: false"
    echo "  images:"
    for r in "${repos[@]}"; do echo "    $r: []"; done
} >"$work/skopeo.yml"
# Docker destinations ask for compressed layers, so plain `skopeo sync` gzips the uncompressed
# test layers (new digests); --preserve-digests copies them unchanged, like Outpost does.
SKOPEO=(skopeo sync --src yaml --dest docker --dest-tls-verify=false "$work/skopeo.yml" "127.0.0.1:$B_PORT")
SKOPEO_P=(skopeo sync --preserve-digests --src yaml --dest docker --dest-tls-verify=false "$work/skopeo.yml" "127.0.0.1:$C_PORT")
run_timed() { # NAME CMD...; prints seconds
    local name=$1; shift
    local t0 t1
    t0=$(now); "$@" >"$work/$name.log" 2>&1 || { cat "$work/$name.log" >&2; exit 1; }; t1=$(now)
    secs "$t0" "$t1"
}
count_tags() { local n=0 k; for r in "${repos[@]}"; do
    k=$(curl -sf "$1/v2/$r/tags/list" | python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("tags") or []))')
    n=$((n + k)); done; echo $n; }
sk_init=$(run_timed skopeo-initial "${SKOPEO[@]}")
echo "skopeo initial: $sk_init s" >&2
skp_init=$(run_timed skopeo-p-initial "${SKOPEO_P[@]}")
echo "skopeo --preserve-digests initial: $skp_init s" >&2
record sk_initial "{\"secs\":$sk_init,\"tags_at_dest\":$(count_tags "$B")}"
record skp_initial "{\"secs\":$skp_init,\"tags_at_dest\":$(count_tags "$C")}"

# ---- 3. incremental: one tag changes at the source ----
last=${repos[$((REPOS - 1))]}
echo "== incremental: $last:t1 moves" >&2
# push at the root, then poll the site from the same process until it serves the new digest
"$BENCH" --registry "$ROOT" --auth "$ROOT_AUTH" push-image --repo "$last" --tag t1 --layers $LAYERS \
    --layer-size $LAYER_SIZE --seed 777777 \
    --await-registry "$SITE" --await-auth "Basic $(printf 'admin:%s' "$SITE_PW" | base64 -w0)" >"$work/push-inc.json"
op_inc=$(jget visible_secs <"$work/push-inc.json")
op_inc_after=$(jget secs <"$work/push-inc.json")
echo "outpost incremental: $op_inc s from push start (push itself $op_inc_after s)" >&2
record op_incremental "{\"secs\":$op_inc,\"push_secs\":$op_inc_after}"

"$BENCH" --registry "$A" push-image --repo "$last" --tag t1 --layers $LAYERS \
    --layer-size $LAYER_SIZE --seed 777777 >/dev/null
da=$(tag_digest "$A" x:x "$last" t1); db0=$(tag_digest "$B" x:x "$last" t1)
sk_inc=$(run_timed skopeo-incremental "${SKOPEO[@]}")
skp_inc=$(run_timed skopeo-p-incremental "${SKOPEO_P[@]}")
db=$(tag_digest "$B" x:x "$last" t1); dc=$(tag_digest "$C" x:x "$last" t1)
echo "skopeo incremental: $sk_inc s (B's $last:t1 $db0 -> $db); --preserve-digests: $skp_inc s (C $dc, A $da)" >&2
ok=0; [ -n "$db" ] && [ "$db" != "$db0" ] && ok=1
okp=0; [ "$dc" = "$da" ] && okp=1
record sk_incremental "{\"secs\":$sk_inc,\"dest_updated\":$ok}"
record skp_incremental "{\"secs\":$skp_inc,\"dest_updated\":$okp}"

# ---- 4. one big blob ----
echo "== one $((BIG >> 20)) MiB blob" >&2
# site-all syncs '*' and would fetch the big blob too, competing with what is measured here
kill "$site_all_pid"; wait "$site_all_pid" 2>/dev/null || true
"$BENCH" --registry "$ROOT" --auth "$ROOT_AUTH" push-image --repo big --tag v1 --layers 1 \
    --layer-size $BIG --seed 4242 >"$work/push-big.json"
bigd=$(curl -sf -u "admin:$ROOT_PW" -H "Accept: $MT" "$ROOT/v2/big/manifests/v1" | jget layers 0 digest)
sync
# curl from the root to /dev/null (warm cache: the blob was just written)
t0=$(now); curl -sf -o /dev/null -u "admin:$ROOT_PW" "$ROOT/v2/big/blobs/$bigd"; t1=$(now)
curl_null=$(secs "$t0" "$t1")
# curl from the root into a file on the same disk, fsynced: what a durable copy costs
t0=$(now); curl -sf -o "$work/big.copy" -u "admin:$ROOT_PW" "$ROOT/v2/big/blobs/$bigd"; sync "$work/big.copy"; t1=$(now)
curl_file=$(secs "$t0" "$t1"); rm -f "$work/big.copy"
cr create -n site-big --repository big >/dev/null
CS_BIG=$(settings site-big)
BIG_PORT=$(free_port); SBIG=http://127.0.0.1:$BIG_PORT
t0=$(now)
start_outpost site-big "$BIG_PORT" "$SITE_PW" "$CS_BIG"
op_big=$(wait_for "$t0" "$SBIG" "$SITE_PW" --blob "big@$bigd")
# the same with the site's data directory in memory: what the sync engine does without a disk
cr create -n site-big-mem --repository big >/dev/null
CS_MEM=$(settings site-big-mem)
MEM_PORT=$(free_port); SMEM=http://127.0.0.1:$MEM_PORT
t0=$(now)
DATA_DIR=$shm/site-big-mem start_outpost site-big-mem "$MEM_PORT" "$SITE_PW" "$CS_MEM"
op_mem=$(wait_for "$t0" "$SMEM" "$SITE_PW" --blob "big@$bigd")
# SHA-256 over the same number of bytes in memory, one core: the ceiling for any verified copy
hash_mb_s=$("$BENCH" hash --size $BIG | jget mb_s)
python3 - "$BIG" "$op_big" "$curl_null" "$curl_file" "$op_mem" "$hash_mb_s" >>"$results" <<'PY'
import json, sys
b, op, cn, cf, om, h = int(sys.argv[1]), *map(float, sys.argv[2:])
print(json.dumps({"name": "big", "r": {"bytes": b, "op_secs": op, "op_mb_s": b / op / 1e6,
      "curl_null_mb_s": b / cn / 1e6, "curl_file_mb_s": b / cf / 1e6,
      "op_mem_mb_s": b / om / 1e6, "sha256_mb_s": h}}))
PY
echo "big blob: site $op_big s, site on tmpfs $op_mem s, curl /dev/null $curl_null s, curl file+fsync $curl_file s, sha256 $hash_mb_s MB/s" >&2

# ---- 5. push-to-leaf latency: root -> site (ReadWrite) -> line (ReadOnly) ----
echo "== push-to-leaf latency through root -> site -> line" >&2
cr create -n site-rw -m ReadWrite --repository lat >/dev/null
cr create -n line-ro -p site-rw --repository lat >/dev/null
CS_RW=$(settings site-rw)
RW_PORT=$(free_port); SRW=http://127.0.0.1:$RW_PORT
start_outpost site-rw "$RW_PORT" "$SITE_PW" "$CS_RW"
for _ in $(seq 600); do
    case $(cr show -n site-rw -o json) in *"127.0.0.1:$RW_PORT"*) break;; esac
    sleep 0.1
done
CS_LINE=$(settings line-ro)
case $CS_LINE in *"ParentGatewayEndpoint=127.0.0.1:$RW_PORT"*) ;; *) echo "line connection string does not point at the site: $CS_LINE" >&2; exit 1;; esac
LINE_PW=$(echo "$CS_LINE" | tr ';' '\n' | sed -n 's/^SyncTokenPassword=//p')
for _ in $(seq 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -u "line-ro:$LINE_PW" "$SRW/gateway/v1/line-ro/config")" = 200 ] && break
    sleep 0.1
done
LINE_PORT=$(free_port); LINE=http://127.0.0.1:$LINE_PORT
start_outpost line-ro "$LINE_PORT" "$SITE_PW" "$CS_LINE"
LINE_AUTH="Basic $(printf 'admin:%s' "$SITE_PW" | base64 -w0)"
# warm-up: the first tag reaches the line through its initial reconcile, not timed
"$BENCH" --registry "$ROOT" --auth "$ROOT_AUTH" push-image --repo lat --tag t0 --layers $LAYERS \
    --layer-size $LAYER_SIZE --seed 9000 --await-registry "$LINE" --await-auth "$LINE_AUTH" >/dev/null
sleep 1
lat=()
for i in $(seq 1 $ROUNDS); do
    s=$("$BENCH" --registry "$ROOT" --auth "$ROOT_AUTH" push-image --repo lat --tag "t$i" --layers $LAYERS \
        --layer-size $LAYER_SIZE --seed $((9000 + i)) --await-registry "$LINE" --await-auth "$LINE_AUTH" | jget visible_secs)
    echo "push-to-leaf round $i: $s s" >&2
    lat+=("$s")
    sleep 0.5
done
record leaf "{\"secs\":[$(IFS=,; echo "${lat[*]}")]}"

python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for l in open(sys.argv[1]):
    r = json.loads(l); rows[r["name"]] = r["r"]
d = rows["data"]
print(f"data: {d['repos']} repositories x {d['tags']} tags, each a distinct image of "
      f"{d['layers']} x {d['layer_size'] >> 10} KiB layers\n")
print(f"| {'metric':40} | {'outpost':>8} | {'skopeo':>8} | {'speedup':>7} | {'skopeo -p':>9} | {'speedup':>7} |")
print(f"|{'-'*42}|{'-'*10}|{'-'*10}|{'-'*9}|{'-'*11}|{'-'*9}|")
for label, n in [("initial sync, all tags (s)", "initial"), ("incremental sync, one tag moved (s)", "incremental")]:
    o, k, p = rows["op_" + n]["secs"], rows["sk_" + n]["secs"], rows["skp_" + n]["secs"]
    print(f"| {label:40} | {o:8.3f} | {k:8.3f} | {k/o:6.1f}x | {p:9.3f} | {p/o:6.1f}x |")
print("(skopeo -p = skopeo sync --preserve-digests)")
b = rows["big"]
print(f"\n| {'one ' + str(b['bytes'] >> 20) + ' MiB blob from the root':52} | {'MB/s':>10} | {'outpost/x':>10} |")
print(f"|{'-'*54}|{'-'*12}|{'-'*12}|")
print(f"| {'Outpost site: start to blob present':52} | {b['op_mb_s']:10.1f} | {'':>10} |")
print(f"| {'curl to /dev/null':52} | {b['curl_null_mb_s']:10.1f} | {b['op_mb_s']/b['curl_null_mb_s']:9.2f}x |")
print(f"| {'curl to a file, then fsync':52} | {b['curl_file_mb_s']:10.1f} | {b['op_mb_s']/b['curl_file_mb_s']:9.2f}x |")
print(f"| {'Outpost site, data directory on tmpfs (no disk)':52} | {b['op_mem_mb_s']:10.1f} | {b['op_mem_mb_s']/b['curl_null_mb_s']:9.2f}x |")
print(f"| {'SHA-256 in memory, one core (verification ceiling)':52} | {b['sha256_mb_s']:10.1f} | {b['sha256_mb_s']/b['curl_null_mb_s']:9.2f}x |")
print("(outpost/x: the row's MB/s over the curl-to-/dev/null row's, except for the fsync row)")
l = rows["leaf"]["secs"]
print(f"\npush-to-leaf (root -> ReadWrite site -> ReadOnly line), {len(l)} rounds: "
      f"median {statistics.median(l)*1000:.0f} ms, max {max(l)*1000:.0f} ms "
      f"(all: {', '.join(f'{x*1000:.0f}' for x in l)} ms)")
print(f"\nchecks: outpost tags with a digest other than the root's: {rows['op_initial']['mismatched_tags']}; "
      f"tags at docker-registry B after skopeo: {rows['sk_initial']['tags_at_dest']}; "
      f"B has the moved tag after the incremental skopeo run: {bool(rows['sk_incremental']['dest_updated'])}; "
      f"tags at C: {rows['skp_initial']['tags_at_dest']}, C has A's new digest: {bool(rows['skp_incremental']['dest_updated'])}; "
      f"outpost push of the moved tag took {rows['op_incremental']['push_secs']:.3f} s of its time")
PY
