#!/usr/bin/env bash
# Real-client interoperability tests for Outpost.
#
# usage: tests/interop/run.sh PATH_TO_OUTPOST_BINARY
#
# Starts its own Outpost (and, for the checks that need them, Debian's docker-registry,
# containerd and dockerd) on free 127.0.0.1 ports in a private temp dir, drives real clients
# (skopeo, podman, docker, ctr, oras-py, umoci) against it, prints `ok   <name>` or
# `FAIL <name>: <why>` (followed by the check's log) per check, and ends with
# `N passed, M failed`. Exits non-zero if any check failed. Everything it started is
# stopped and its temp dir removed on exit (set INTEROP_KEEP=1 to keep the dir).
#
# Outpost requires authentication: it is started with a random administrator password
# (token `admin`), every client authenticates with it (skopeo --creds, podman login, docker
# login, ctr --user, oras-py login, curl -u), and the auth-* checks create scope-mapped tokens
# through the management API and check what each client sees when access is refused.
# docker-registry (the peer registry) stays unauthenticated.
#
# Needs (tests/deps.sh installs them): skopeo podman docker.io containerd umoci
# docker-registry curl jq python3, and a python with the `oras` package in $ORAS_PY.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 PATH_TO_OUTPOST_BINARY" >&2
    exit 2
fi
OUTPOST=$(realpath "$1")
[ -x "$OUTPOST" ] || { echo "$0: $1 is not an executable" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ORAS_PY=${ORAS_PY:-python3}
DOCKER=${DOCKER:-/usr/bin/docker} # Debian's client; /usr/local/bin/docker may be another one
T="timeout --kill-after=10 300"   # no client command may hang the run

WORK=$(mktemp -d /tmp/outpost-interop.XXXXXX)
LOGS=$WORK/logs
mkdir -p "$LOGS"
PIDFILE=$WORK/pids # "pid name" per line, for everything started in the background

# dockerd, runc and friends live in sbin, which a non-login root shell may lack
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export HOME=${HOME:-$WORK/home}

# Keep every client's config private to this run.
export DOCKER_CONFIG=$WORK/docker-config
export REGISTRY_AUTH_FILE=$WORK/containers-auth.json
export CONTAINERS_REGISTRIES_CONF=$WORK/registries.conf
printf 'unqualified-search-registries = []\n' >"$CONTAINERS_REGISTRIES_CONF"
echo '{}' >"$REGISTRY_AUTH_FILE"

cleanup() {
    local rc=$?
    set +e
    if [ -f "$PIDFILE" ]; then
        # stop in reverse start order (dockerd before containerd), by pid only
        tac "$PIDFILE" | while read -r pid name; do
            kill "$pid" 2>/dev/null || continue
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -9 "$pid" 2>/dev/null && echo "note: $name ($pid) needed SIGKILL" >&2
        done
    fi
    # anything still mounted under the work dir (containerd snapshots, image mounts)
    awk -v w="$WORK" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null; done
    if [ "${INTEROP_KEEP:-0}" = 1 ]; then
        echo "kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# spawn NAME LOGFILE CMD... : start CMD in the background and remember its pid
spawn() {
    local name=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 </dev/null &
    echo "$! $name" >>"$PIDFILE"
}

# wait_until SECONDS CMD... : poll CMD until it succeeds
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.3
    done
}

# ---------------------------------------------------------------------------------------
# check harness. Each check runs in a subshell with errexit; its stdout+stderr go to a log
# that is printed when it fails. `fail MSG` ends it with a reason; any other failing command
# ends it with "command failed: <command>".
PASSED=0
FAILED=0
run_check() {
    local name=$1 fn=$2
    local log=$LOGS/$name.log
    WHY=$LOGS/$name.why
    rm -f "$WHY" "$WHY.fail"
    : >"$WHY"
    local outpost_lines
    outpost_lines=$(wc -l <"$LOGS/outpost.log")
    set +e
    (
        set -eE -o pipefail
        # the last failing command is the reason, unless fail() gave one
        trap 'rc=$?; [ -e "$WHY.fail" ] || echo "command failed (exit $rc): $BASH_COMMAND" >"$WHY"' ERR
        "$fn"
    ) >"$log" 2>&1 </dev/null
    local rc=$?
    set -e
    if [ $rc -eq 0 ]; then
        echo "ok   $name"
        PASSED=$((PASSED + 1))
    else
        [ -s "$WHY" ] || echo "exit status $rc" >"$WHY"
        echo "FAIL $name: $(head -c 3000 "$WHY")"
        tail -n 80 "$log" | sed 's/^/    | /'
        echo "    outpost's log during this check (last 40 lines):"
        tail -n +$((outpost_lines + 1)) "$LOGS/outpost.log" | tail -n 40 | sed 's/^/    outpost| /'
        FAILED=$((FAILED + 1))
    fi
}

fail() {
    echo "$*" >"$WHY"
    touch "$WHY.fail"
    echo "FAILED: $*"
    exit 1
}

# run CMD... : log the command, then run it under the timeout
run() {
    echo "+ $*"
    local rc=0
    $T "$@" || rc=$?
    [ $rc -eq 0 ] || fail "exit status $rc from: $*"
}

expect_eq() { # WHAT EXPECTED ACTUAL
    [ "$2" = "$3" ] || fail "$1: expected '$2', got '$3'"
    echo "  ok: $1 = $2"
}

expect_contains() { # WHAT HAYSTACK NEEDLE
    case "$2" in
        *"$3"*) echo "  ok: $1 contains '$3'" ;;
        *) fail "$1: '$3' not found in: $(printf '%s' "$2" | head -c 1500)" ;;
    esac
}

# ---------------------------------------------------------------------------------------
# registry helpers (Outpost at $REG)
ACCEPT_ALL='application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json'

# Credentials: Outpost ($REG) gets the administrator's, docker-registry ($DIST) none.
# (ADMIN_PW is random base64url, so these unquoted expansions split only where meant to.)
curl_creds() { # HOST -> curl arguments
    [ "$1" != "$REG" ] || echo "-u $ADMIN"
}
skopeo_creds() { # HOST -> skopeo arguments for inspect/list-tags/delete
    # $REG, and the other admin-password registries a check names in ADMIN_HOSTS
    if [ "$1" = "$REG" ] || [[ " ${ADMIN_HOSTS:-} " == *" $1 "* ]]; then echo "--creds=$ADMIN"; fi
}
ref_host() { # docker://HOST/REPO... -> HOST
    local r=${1#docker://}
    echo "${r%%/*}"
}

head_header() { # HOST REPO REF HEADER -> value of HEADER on HEAD /v2/REPO/manifests/REF
    curl -sS -f -I $(curl_creds "$1") -H "Accept: $ACCEPT_ALL" "http://$1/v2/$2/manifests/$3" |
        tr -d '\r' | awk -v h="$(echo "$4" | tr '[:upper:]' '[:lower:]'):" 'tolower($1) == h { print $2 }'
}

raw_sha() { # REFERENCE (docker://...) -> sha256:<hex of skopeo inspect --raw>
    local hex
    hex=$($T skopeo inspect --tls-verify=false $(skopeo_creds "$(ref_host "$1")") --raw "$1" | sha256sum | cut -d' ' -f1)
    echo "sha256:$hex"
}

# expect_manifest HOST REPO REF DIGEST : the registry serves exactly DIGEST for REF (tag or digest)
expect_manifest() {
    local ref="$1/$2:$3"
    case "$3" in sha256:*) ref="$1/$2@$3" ;; esac
    expect_eq "Docker-Content-Digest of $ref" "$4" "$(head_header "$1" "$2" "$3" Docker-Content-Digest)"
    expect_eq "sha256 of the bytes skopeo gets for $ref" "$4" "$(raw_sha "docker://$ref")"
}

layout_digest() { # LAYOUT TAG -> digest recorded in index.json for TAG
    jq -r --arg t "$2" '[.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t)] | last | .digest' "$1/index.json"
}

layout_blob() { # LAYOUT DIGEST -> path
    echo "$1/blobs/${2%%:*}/${2#*:}"
}

# same_blobs FROM TO COUNT : every blob in layout TO is intact and byte-identical to FROM's,
# and TO holds exactly COUNT blobs
same_blobs() {
    local from=$1 to=$2 count=$3 n=0 f hex
    for f in "$to"/blobs/sha256/*; do
        hex=$(basename "$f")
        expect_eq "sha256 of blob $hex in $to" "$hex" "$(sha256sum <"$f" | cut -d' ' -f1)" >/dev/null
        cmp -s "$f" "$from/blobs/sha256/$hex" || fail "blob $hex in $to differs from (or is missing in) $from"
        n=$((n + 1))
    done
    expect_eq "number of blobs copied back into $to" "$count" "$n"
}

# all_blobs_present HOST REPO LAYOUT DIGEST : every manifest and blob below DIGEST (from the
# fixture layout) is served by HOST/REPO with the right size
all_blobs_present() {
    local host=$1 repo=$2 layout=$3 digest=$4 doc d size got
    doc=$(layout_blob "$layout" "$digest")
    got=$(head_header "$host" "$repo" "$digest" Content-Length)
    expect_eq "size of manifest $digest in $host/$repo" "$(stat -c %s "$doc")" "$got" >/dev/null
    if jq -e '.manifests' "$doc" >/dev/null; then
        for d in $(jq -r '.manifests[].digest' "$doc"); do
            all_blobs_present "$host" "$repo" "$layout" "$d"
        done
        return
    fi
    jq -r '.config, .layers[] | "\(.digest) \(.size)"' "$doc" | while read -r d size; do
        got=$(curl -sS -f -I $(curl_creds "$host") "http://$host/v2/$repo/blobs/$d" | tr -d '\r' | awk 'tolower($1) == "content-length:" { print $2 }')
        expect_eq "size of blob $d in $host/$repo" "$size" "$got" >/dev/null
    done
    echo "  ok: every blob of $digest is in $host/$repo"
}

# expect_files ROOTFS LAYOUT REF [PLATFORM] : the unpacked files are those the fixture's layers hold
expect_files() {
    local want got
    want=$(python3 "$HERE/layerfiles.py" "$2" "$3" --platform "${4:-linux/amd64}")
    got=$(cd "$1" && find . -type f | LC_ALL=C sort | xargs -r sha256sum)
    [ -n "$want" ] || fail "fixture $3 has no files (test bug)"
    [ "$want" = "$got" ] || fail "files in $1 differ from the layers of $3:
--- expected
$want
--- got
$got"
    echo "  ok: $(echo "$want" | wc -l) files in $1 are byte-identical to the layers of $3"
}

push_fixture() { # TAG REPO:TAG [extra skopeo args]: copy a fixture into Outpost (as admin)
    local tag=$1 dest=$2
    shift 2
    run skopeo copy -q "$@" --dest-tls-verify=false --dest-creds "$ADMIN" "oci:$FIX:$tag" "docker://$REG/$dest"
}

# ---------------------------------------------------------------------------------------
# services started on demand (idempotent; usable from inside a check)
DIST_PORT_FILE=$WORK/dist.port
ensure_distribution() {
    if [ -s "$DIST_PORT_FILE" ]; then
        DIST=127.0.0.1:$(cat "$DIST_PORT_FILE")
        return
    fi
    local port
    port=$(free_port)
    mkdir -p "$WORK/distribution"
    cat >"$WORK/distribution/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $WORK/distribution/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
    # (docker-registry reads REGISTRY_* variables as configuration: hide ours)
    spawn docker-registry "$LOGS/docker-registry.log" env -u REGISTRY_AUTH_FILE docker-registry serve "$WORK/distribution/config.yml"
    wait_until 30 curl -sf "http://127.0.0.1:$port/v2/" ||
        fail "docker-registry did not come up on 127.0.0.1:$port: $(tail -n 20 "$LOGS/docker-registry.log")"
    echo "$port" >"$DIST_PORT_FILE"
    DIST=127.0.0.1:$port
}

CTD_SOCK=$WORK/containerd/containerd.sock
CTR="ctr --address $CTD_SOCK --namespace outpost-interop"
ensure_containerd() {
    if $CTR version >/dev/null 2>&1; then return; fi
    mkdir -p "$WORK/containerd"
    cat >"$WORK/containerd/config.toml" <<EOF
version = 2
root = "$WORK/containerd/root"
state = "$WORK/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[plugins."io.containerd.metadata.v1.bolt"]
  # a namespace sees only content it fetched itself
  content_sharing_policy = "isolated"
[grpc]
  address = "$CTD_SOCK"
[ttrpc]
  address = "$CTD_SOCK.ttrpc"
[debug]
  address = "$WORK/containerd/debug.sock"
EOF
    spawn containerd "$LOGS/containerd.log" containerd --config "$WORK/containerd/config.toml"
    wait_until 30 $CTR version || fail "containerd did not come up: $(tail -n 20 "$LOGS/containerd.log")"
}

DOCKER_SOCK=$WORK/docker/docker.sock
D="$DOCKER --config $WORK/docker-cli --host unix://$DOCKER_SOCK"
ensure_dockerd() {
    if $D version >/dev/null 2>&1; then return; fi
    ensure_containerd
    mkdir -p "$WORK/docker"
    echo '{}' >"$WORK/docker/daemon.json"
    spawn dockerd "$LOGS/dockerd.log" dockerd \
        --config-file "$WORK/docker/daemon.json" \
        --containerd "$CTD_SOCK" \
        --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none \
        --data-root "$WORK/docker/data" --exec-root "$WORK/docker/exec" \
        --host "unix://$DOCKER_SOCK" --pidfile "$WORK/docker/docker.pid" \
        --insecure-registry "$REG"
    wait_until 60 $D version || fail "dockerd did not come up: $(tail -n 30 "$LOGS/dockerd.log")"
}

# podman keeps its logins in a private auth file (podman_login writes it); skopeo's is empty
PODMAN_AUTH=$WORK/podman/auth.json
PODMAN="env REGISTRY_AUTH_FILE=$PODMAN_AUTH podman --root $WORK/podman/root --runroot $WORK/podman/run --tmpdir $WORK/podman/tmp --storage-driver vfs --cgroup-manager cgroupfs --events-backend file"

# ---------------------------------------------------------------------------------------
# checks

check_skopeo_image() {
    push_fixture img skopeo/img:v1
    expect_manifest "$REG" skopeo/img v1 "$IMG_DIGEST"
    run skopeo copy -q --src-tls-verify=false --src-creds "$ADMIN" "docker://$REG/skopeo/img:v1" "oci:$WORK/skopeo-img:v1"
    expect_eq "digest in the pulled layout's index.json" "$IMG_DIGEST" "$(layout_digest "$WORK/skopeo-img" v1)"
    same_blobs "$FIX" "$WORK/skopeo-img" 5 # manifest, config, 3 layers
}

check_skopeo_index() {
    push_fixture multi skopeo/multi:v1 --all
    expect_manifest "$REG" skopeo/multi v1 "$MULTI_DIGEST"
    expect_eq "Content-Type of the index" application/vnd.oci.image.index.v1+json \
        "$(head_header "$REG" skopeo/multi v1 Content-Type)"
    local arch
    arch=$($T skopeo inspect --tls-verify=false --creds "$ADMIN" --override-arch arm64 "docker://$REG/skopeo/multi:v1" | jq -r .Architecture)
    expect_eq "architecture skopeo resolves for --override-arch arm64" arm64 "$arch"
    run skopeo copy -q --all --src-tls-verify=false --src-creds "$ADMIN" "docker://$REG/skopeo/multi:v1" "oci:$WORK/skopeo-multi:v1"
    expect_eq "digest in the pulled layout's index.json" "$MULTI_DIGEST" "$(layout_digest "$WORK/skopeo-multi" v1)"
    same_blobs "$FIX" "$WORK/skopeo-multi" 9 # index, 2 x (manifest, config, 2 layers)
}

check_skopeo_docker_list() {
    # skopeo converts the OCI index to a Docker manifest list + schema2 manifests
    push_fixture multi skopeo/dlist:v1 --all --format v2s2
    local digest
    digest=$(head_header "$REG" skopeo/dlist v1 Docker-Content-Digest)
    expect_eq "Content-Type of the converted list" application/vnd.docker.distribution.manifest.list.v2+json \
        "$(head_header "$REG" skopeo/dlist v1 Content-Type)"
    expect_eq "sha256 of the bytes served" "$digest" "$(raw_sha "docker://$REG/skopeo/dlist:v1")"
    local child
    child=$($T skopeo inspect --tls-verify=false --creds "$ADMIN" --raw "docker://$REG/skopeo/dlist:v1" |
        jq -r '.manifests[] | select(.platform.architecture == "arm64") | .digest')
    expect_eq "Content-Type of the arm64 child" application/vnd.docker.distribution.manifest.v2+json \
        "$(head_header "$REG" skopeo/dlist "$child" Content-Type)"
    run skopeo copy -q --src-tls-verify=false --src-creds "$ADMIN" --override-arch arm64 "docker://$REG/skopeo/dlist:v1" "dir:$WORK/dlist-arm64"
    expect_eq "layers of the arm64 image" \
        "$(jq -r '.layers[].digest' "$(layout_blob "$FIX" "$(jq -r '.manifests[] | select(.platform.architecture == "arm64") | .digest' "$(layout_blob "$FIX" "$MULTI_DIGEST")")")" | sort | tr '\n' ' ')" \
        "$(jq -r '.layers[].digest' "$WORK/dlist-arm64/manifest.json" | sort | tr '\n' ' ')"
}

check_skopeo_tags() {
    push_fixture img skopeo/tags:one
    # same blobs into the same repo under other tags, straight from Outpost
    run skopeo copy -q --src-tls-verify=false --dest-tls-verify=false --src-creds "$ADMIN" --dest-creds "$ADMIN" "docker://$REG/skopeo/tags:one" "docker://$REG/skopeo/tags:two"
    run skopeo copy -q --src-tls-verify=false --dest-tls-verify=false --src-creds "$ADMIN" --dest-creds "$ADMIN" "docker://$REG/skopeo/tags:one" "docker://$REG/skopeo/tags:three"
    local tags
    tags=$($T skopeo list-tags --tls-verify=false --creds "$ADMIN" "docker://$REG/skopeo/tags" | jq -r '.Tags | sort | join(",")')
    expect_eq "skopeo list-tags" "one,three,two" "$tags"
    expect_manifest "$REG" skopeo/tags three "$IMG_DIGEST"
    local catalog
    catalog=$(curl -sS -u "$ADMIN" -f "http://$REG/v2/_catalog" | jq -r '.repositories | join(",")')
    expect_contains "GET /v2/_catalog" ",$catalog," ",skopeo/tags,"
}

check_skopeo_delete_and_errors() {
    push_fixture img skopeo/del:v1
    run skopeo delete --tls-verify=false --creds "$ADMIN" "docker://$REG/skopeo/del:v1"
    local out
    out=$($T skopeo inspect --tls-verify=false --creds "$ADMIN" "docker://$REG/skopeo/del:v1" 2>&1) && fail "skopeo inspect of a deleted image succeeded: $out"
    expect_contains "skopeo inspect after delete" "$out" "manifest unknown"
    expect_eq "tags after delete" "" "$($T skopeo list-tags --tls-verify=false --creds "$ADMIN" "docker://$REG/skopeo/del" | jq -r '.Tags | join(",")')"
    out=$($T skopeo inspect --tls-verify=false --creds "$ADMIN" "docker://$REG/skopeo/no-such-repo:v1" 2>&1) && fail "skopeo inspect of a missing repository succeeded: $out"
    expect_contains "skopeo inspect of a missing repository" "$out" "name unknown"
    out=$($T skopeo inspect --tls-verify=false --creds "$ADMIN" "docker://$REG/skopeo/del:no-such-tag" 2>&1) && fail "skopeo inspect of a missing tag succeeded: $out"
    expect_contains "skopeo inspect of a missing tag" "$out" "manifest unknown"
}

check_distribution_to() {
    ensure_distribution
    push_fixture img dist-src/img:v1
    push_fixture multi dist-src/multi:v1 --all
    run skopeo copy -q --src-tls-verify=false --src-creds "$ADMIN" --dest-tls-verify=false "docker://$REG/dist-src/img:v1" "docker://$DIST/from-outpost/img:v1"
    run skopeo copy -q --all --src-tls-verify=false --src-creds "$ADMIN" --dest-tls-verify=false "docker://$REG/dist-src/multi:v1" "docker://$DIST/from-outpost/multi:v1"
    expect_manifest "$DIST" from-outpost/img v1 "$IMG_DIGEST"
    expect_manifest "$DIST" from-outpost/multi v1 "$MULTI_DIGEST"
    all_blobs_present "$DIST" from-outpost/multi "$FIX" "$MULTI_DIGEST"
}

check_distribution_from() {
    ensure_distribution
    # fixtures go into docker-registry directly, then docker-registry -> Outpost
    run skopeo copy -q --dest-tls-verify=false "oci:$FIX:img" "docker://$DIST/to-outpost/img:v1"
    run skopeo copy -q --all --dest-tls-verify=false "oci:$FIX:multi" "docker://$DIST/to-outpost/multi:v1"
    run skopeo copy -q --all --format v2s2 --dest-tls-verify=false "oci:$FIX:multi" "docker://$DIST/to-outpost/dlist:v1"
    local dlist
    dlist=$(head_header "$DIST" to-outpost/dlist v1 Docker-Content-Digest)
    run skopeo copy -q --src-tls-verify=false --dest-tls-verify=false --dest-creds "$ADMIN" "docker://$DIST/to-outpost/img:v1" "docker://$REG/from-dist/img:v1"
    run skopeo copy -q --all --src-tls-verify=false --dest-tls-verify=false --dest-creds "$ADMIN" "docker://$DIST/to-outpost/multi:v1" "docker://$REG/from-dist/multi:v1"
    run skopeo copy -q --all --src-tls-verify=false --dest-tls-verify=false --dest-creds "$ADMIN" "docker://$DIST/to-outpost/dlist:v1" "docker://$REG/from-dist/dlist:v1"
    expect_manifest "$REG" from-dist/img v1 "$IMG_DIGEST"
    expect_manifest "$REG" from-dist/multi v1 "$MULTI_DIGEST"
    expect_manifest "$REG" from-dist/dlist v1 "$dlist"
    all_blobs_present "$REG" from-dist/multi "$FIX" "$MULTI_DIGEST"
}

podman_login() { # USER PASSWORD [podman login args]: podman login to Outpost
    local user=$1 pw=$2 out
    shift 2
    echo "+ podman login --tls-verify=false -u $user --password-stdin $* $REG"
    out=$(echo "$pw" | $T $PODMAN login --tls-verify=false -u "$user" --password-stdin "$@" "$REG" 2>&1) ||
        fail "podman login as $user failed: $out"
    echo "$out"
    expect_contains "podman login output" "$out" "Login Succeeded"
}

check_podman() {
    mkdir -p "$WORK/podman/tmp"
    podman_login admin "$ADMIN_PW"
    # podman names an oci: image after its path, which must be lowercase: use a relative one
    cd "$WORK"
    run $PODMAN pull -q oci:fixtures:img
    local config id pushed
    config=$(jq -r .config.digest "$(layout_blob "$FIX" "$IMG_DIGEST")")
    id=$($PODMAN images -q --no-trunc | head -n1)
    expect_eq "image ID podman loaded from the fixture" "$config" "$id"
    run $PODMAN tag "$id" "$REG/podman/img:v1"
    run $PODMAN push --tls-verify=false --digestfile "$WORK/podman/digest" "$REG/podman/img:v1"
    pushed=$(cat "$WORK/podman/digest")
    expect_manifest "$REG" podman/img v1 "$pushed"
    run $PODMAN rmi -a -f
    expect_eq "images left after podman rmi -a" "" "$($PODMAN images -q)"
    run $PODMAN pull --tls-verify=false "$REG/podman/img:v1"
    expect_eq "image ID after podman pull" "$config" \
        "sha256:$($PODMAN image inspect --format '{{.Id}}' "$REG/podman/img:v1")"
    expect_eq "digest after podman pull" "$pushed" \
        "$($PODMAN image inspect --format '{{.Digest}}' "$REG/podman/img:v1")"
    local mnt
    mnt=$($PODMAN image mount "$REG/podman/img:v1")
    expect_files "$mnt" "$FIX" img
    $PODMAN image unmount "$REG/podman/img:v1" >/dev/null
}

check_podman_manifest_list() {
    mkdir -p "$WORK/podman/tmp"
    podman_login admin "$ADMIN_PW"
    push_fixture multi podman/src:v1 --all
    local list=$REG/podman/list:v1 pushed
    run $PODMAN manifest create "$list"
    run $PODMAN manifest add --all --tls-verify=false "$list" "docker://$REG/podman/src:v1"
    run $PODMAN manifest push --all --tls-verify=false --digestfile "$WORK/podman/list-digest" "$list" "docker://$list"
    pushed=$(cat "$WORK/podman/list-digest")
    expect_manifest "$REG" podman/list v1 "$pushed"
    expect_eq "platform manifests in the pushed list" \
        "$(jq -r '.manifests[] | "\(.platform.os)/\(.platform.architecture) \(.digest)"' "$(layout_blob "$FIX" "$MULTI_DIGEST")" | sort)" \
        "$($T skopeo inspect --tls-verify=false --creds "$ADMIN" --raw "docker://$list" | jq -r '.manifests[] | "\(.platform.os)/\(.platform.architecture) \(.digest)"' | sort)"
    local child # (podman rewrites the list itself, so only its children are the fixture's)
    for child in $(jq -r '.manifests[].digest' "$(layout_blob "$FIX" "$MULTI_DIGEST")"); do
        all_blobs_present "$REG" podman/list "$FIX" "$child"
    done
}

docker_login() { # log the docker CLI in to Outpost as admin
    local out
    out=$(echo "$ADMIN_PW" | $T $D login "$REG" -u admin --password-stdin 2>&1) || fail "docker login failed: $out"
    echo "$out"
    expect_contains "docker login output" "$out" "Login Succeeded"
}

check_docker_login() {
    ensure_dockerd
    local out
    out=$(echo "wrong-$ADMIN_PW" | $T $D login "$REG" -u admin --password-stdin 2>&1) &&
        fail "docker login with a wrong password succeeded: $out"
    echo "$out"
    expect_contains "docker login with a wrong password" "$out" "incorrect username or password"
    docker_login
    expect_contains "docker's stored credentials" "$(cat "$WORK/docker-cli/config.json")" "\"$REG\""
}

check_docker_push_pull() {
    ensure_dockerd
    docker_login
    mkdir -p "$WORK/docker-img/rootfs/etc"
    echo "hello from outpost interop $$ $RANDOM" >"$WORK/docker-img/rootfs/hello.txt"
    head -c 300000 /dev/urandom >"$WORK/docker-img/rootfs/etc/random.bin"
    tar -C "$WORK/docker-img/rootfs" -cf "$WORK/docker-img/rootfs.tar" .
    local id out pushed
    id=$($T $D import "$WORK/docker-img/rootfs.tar" outpost-interop:src)
    run $D tag outpost-interop:src "$REG/docker/hello:v1"
    out=$($T $D push "$REG/docker/hello:v1" 2>&1) || fail "docker push failed: $out"
    echo "$out"
    pushed=$(echo "$out" | sed -n 's/^v1: digest: \(sha256:[0-9a-f]*\) size: .*/\1/p')
    [ -n "$pushed" ] || fail "no digest in docker push output"
    expect_manifest "$REG" docker/hello v1 "$pushed"
    expect_eq "Content-Type of the pushed manifest" application/vnd.docker.distribution.manifest.v2+json \
        "$(head_header "$REG" docker/hello v1 Content-Type)"
    # a second repository: the layer must be mounted across repositories, not uploaded again
    run $D tag outpost-interop:src "$REG/docker/other:v1"
    out=$($T $D push "$REG/docker/other:v1" 2>&1) || fail "docker push (second repo) failed: $out"
    echo "$out"
    expect_contains "docker push to a second repo" "$out" "Mounted from docker/hello"
    run $D rmi outpost-interop:src "$REG/docker/hello:v1" "$REG/docker/other:v1"
    expect_eq "local images after docker rmi" "" "$($D images -q)"
    run $D pull "$REG/docker/hello:v1"
    expect_eq "image ID after docker pull" "$id" "$($D image inspect --format '{{.Id}}' "$REG/docker/hello:v1")"
    expect_eq "RepoDigests after docker pull" "$REG/docker/hello@$pushed" \
        "$($D image inspect --format '{{join .RepoDigests " "}}' "$REG/docker/hello:v1")"
    run $D create --name outpost-interop-c "$REG/docker/hello:v1" /none
    local content
    content=$($D cp outpost-interop-c:/hello.txt - | tar -xO)
    expect_eq "hello.txt in the pulled image" "$(cat "$WORK/docker-img/rootfs/hello.txt")" "$content"
    expect_eq "sha256 of etc/random.bin in the pulled image" \
        "$(sha256sum <"$WORK/docker-img/rootfs/etc/random.bin")" \
        "$($D cp outpost-interop-c:/etc/random.bin - | tar -xO | sha256sum)"
    run $D rm outpost-interop-c
    # by digest, and a tag that does not exist
    run $D rmi "$REG/docker/hello:v1"
    run $D pull "$REG/docker/hello@$pushed"
    expect_eq "image ID after docker pull by digest" "$id" "$($D image inspect --format '{{.Id}}' "$REG/docker/hello@$pushed")"
    out=$($T $D pull "$REG/docker/hello:no-such-tag" 2>&1) && fail "docker pull of a missing tag succeeded: $out"
    echo "$out"
    expect_contains "docker pull of a missing tag" "$out" "manifest unknown"
}

check_docker_pull_oci_index() {
    ensure_dockerd
    docker_login
    push_fixture multi docker/multi:v1 --all
    run $D pull "$REG/docker/multi:v1"
    local amd64 config
    amd64=$(jq -r '.manifests[] | select(.platform.architecture == "amd64") | .digest' "$(layout_blob "$FIX" "$MULTI_DIGEST")")
    config=$(jq -r .config.digest "$(layout_blob "$FIX" "$amd64")")
    expect_eq "image ID docker pulled from the OCI index (linux/amd64)" "$config" \
        "$($D image inspect --format '{{.Id}}' "$REG/docker/multi:v1")"
    expect_eq "RepoDigests" "$REG/docker/multi@$MULTI_DIGEST" \
        "$($D image inspect --format '{{join .RepoDigests " "}}' "$REG/docker/multi:v1")"
}

ctr_digest() { # REF -> digest column of `ctr images ls`
    $CTR images ls "name==$1" | awk 'NR == 2 { print $3 }'
}

check_ctr_image() {
    ensure_containerd
    push_fixture img ctr/img:v1
    run $CTR images pull --plain-http --user "$ADMIN" "$REG/ctr/img:v1"
    expect_eq "digest in ctr images ls" "$IMG_DIGEST" "$(ctr_digest "$REG/ctr/img:v1")"
    expect_contains "ctr images check" "$($CTR images check "name==$REG/ctr/img:v1")" "complete"
    mkdir -p "$WORK/ctr-mnt"
    run $CTR images mount "$REG/ctr/img:v1" "$WORK/ctr-mnt"
    expect_files "$WORK/ctr-mnt" "$FIX" img
    run $CTR images unmount "$WORK/ctr-mnt"
}

check_ctr_index() {
    ensure_containerd
    push_fixture multi ctr/multi:v1 --all
    run $CTR images pull --plain-http --user "$ADMIN" --all-platforms "$REG/ctr/multi:v1"
    expect_eq "digest in ctr images ls" "$MULTI_DIGEST" "$(ctr_digest "$REG/ctr/multi:v1")"
    expect_contains "platforms in ctr images ls" "$($CTR images ls "name==$REG/ctr/multi:v1")" "linux/amd64,linux/arm64"
    expect_contains "ctr images check" "$($CTR images check "name==$REG/ctr/multi:v1")" "complete (3/3)"
    # and push it back under a new name with containerd's own pusher
    run $CTR images push --plain-http --user "$ADMIN" "$REG/ctr/pushed:v1" "$REG/ctr/multi:v1"
    expect_manifest "$REG" ctr/pushed v1 "$MULTI_DIGEST"
    all_blobs_present "$REG" ctr/pushed "$FIX" "$MULTI_DIGEST"
    # a single platform of it, in a fresh namespace (content is not shared between namespaces)
    run ctr --address "$CTD_SOCK" --namespace outpost-interop-2 images pull --plain-http --user "$ADMIN" --platform linux/arm64 "$REG/ctr/pushed:v1"
    mkdir -p "$WORK/ctr-mnt-arm64"
    run ctr --address "$CTD_SOCK" --namespace outpost-interop-2 images mount --platform linux/arm64 "$REG/ctr/pushed:v1" "$WORK/ctr-mnt-arm64"
    expect_files "$WORK/ctr-mnt-arm64" "$FIX" multi linux/arm64
    run ctr --address "$CTD_SOCK" --namespace outpost-interop-2 images unmount "$WORK/ctr-mnt-arm64"
}

# oras-py (0.2.x) can push a manifest with a `subject`, but has no artifactType parameter:
# the SBOM is pushed with oras' push() (its artifact type then comes from config.mediaType,
# as the referrers API specifies), and the signature manifest, which carries an explicit
# artifactType, is built here and sent with oras' own upload_blob()/upload_manifest().
ORAS_SCRIPT='
import json, os, sys
from dataclasses import asdict
import oras.client, oras.oci, oras.defaults

reg, repo, subj_digest, subj_size, subj_type, workdir = sys.argv[1:7]
os.chdir(workdir)
# oras-py 0.2.x: the "token" auth backend keeps the first token it gets (pull scope, from a
# HEAD) and retries a 401 asking for more scope (push) with that same token, so it cannot
# push where a bearer token lacking scope gets 401 + a wider challenge (Outpost, like
# distribution). The "basic" backend sends the credentials with every request instead.
client = oras.client.OrasClient(hostname=reg, insecure=True, auth_backend="basic")
# (login also records the credentials, in a private docker config)
client.login(username="admin", password=os.environ["ORAS_ADMIN_PASSWORD"], hostname=reg,
             config_path=os.path.join(workdir, "docker-config.json"))
subject = oras.oci.Subject(mediaType=subj_type, digest=subj_digest, size=int(subj_size))
out = {}

resp = client.push(
    target=f"{reg}/{repo}:sbom",
    files=["sbom.json:application/vnd.example.sbom"],
    manifest_config="sbom-config.json:application/vnd.example.sbom",
    manifest_annotations={"org.example.kind": "sbom"},
    subject=subject,
    quiet=True,
)
out["sbom"] = {"status": resp.status_code, "headers": {k.lower(): v for k, v in resp.headers.items()}}

# explicit artifactType + the empty config, through the lower-level oras API
container = client.get_container(f"{reg}/{repo}:sig")
empty = {"mediaType": "application/vnd.oci.empty.v1+json",
         "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2}
with open("empty.json", "w") as f:
    f.write("{}")
r = client.upload_blob("empty.json", container, empty)
client._check_200_response(r)
layer = oras.oci.NewLayer("sig.bin", media_type="application/vnd.example.signature.v1")
layer["annotations"] = {"org.opencontainers.image.title": "sig.bin"}
r = client.upload_blob("sig.bin", container, layer)
client._check_200_response(r)
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.example.signature", "config": empty, "layers": [layer],
            "subject": asdict(subject), "annotations": {"org.example.kind": "signature"}}
resp = client.upload_manifest(manifest, container)
out["sig"] = {"status": resp.status_code, "headers": {k.lower(): v for k, v in resp.headers.items()}}

files = client.pull(target=f"{reg}/{repo}:sbom", outdir=os.path.join(workdir, "pulled"))
out["pulled"] = files

# a 3 MB file in 1 MB chunks (POST, PATCH x3 with Content-Range, PUT ?digest=)
resp = client.push(target=f"{reg}/{repo}:chunked", files=["big.bin:application/octet-stream"],
                   do_chunked=True, chunk_size=1000000, quiet=True)
out["chunked"] = {"status": resp.status_code}
client.pull(target=f"{reg}/{repo}:chunked", outdir=os.path.join(workdir, "pulled"))
print("RESULT " + json.dumps(out))
'

check_oras() {
    "$ORAS_PY" -c 'import oras.client' 2>/dev/null ||
        fail "no oras python package in ORAS_PY=$ORAS_PY (tests/deps.sh or .ci/run installs it into a venv)"
    echo "oras $("$ORAS_PY" -c 'import oras.version; print(oras.version.__version__)')"
    push_fixture img oras/img:v1
    local w=$WORK/oras
    mkdir -p "$w"
    echo "{\"bomFormat\":\"CycloneDX\",\"serial\":\"$RANDOM$RANDOM\"}" >"$w/sbom.json"
    echo '{"generator":"outpost-interop"}' >"$w/sbom-config.json"
    head -c 512 /dev/urandom >"$w/sig.bin"
    head -c 3000000 /dev/urandom >"$w/big.bin"
    local size out
    size=$(head_header "$REG" oras/img v1 Content-Length)
    out=$(ORAS_ADMIN_PASSWORD=$ADMIN_PW $T "$ORAS_PY" -c "$ORAS_SCRIPT" "$REG" oras/img "$IMG_DIGEST" "$size" \
        application/vnd.oci.image.manifest.v1+json "$w" 2>&1) || fail "oras push/pull failed: $out"
    echo "$out"
    local res
    res=$(echo "$out" | sed -n 's/^RESULT //p')
    echo "$res" >"$w/result.json"
    expect_eq "status of oras manifest push" 201 "$(jq -r .sbom.status "$w/result.json")"
    expect_eq "OCI-Subject on the SBOM push response" "$IMG_DIGEST" "$(jq -r '.sbom.headers["oci-subject"]' "$w/result.json")"
    expect_eq "OCI-Subject on the signature push response" "$IMG_DIGEST" "$(jq -r '.sig.headers["oci-subject"]' "$w/result.json")"
    local sbom sig
    sbom=$(jq -r '.sbom.headers["docker-content-digest"]' "$w/result.json")
    sig=$(jq -r '.sig.headers["docker-content-digest"]' "$w/result.json")
    expect_eq "digest of oras:sbom" "$sbom" "$(head_header "$REG" oras/img sbom Docker-Content-Digest)"
    cmp "$w/sbom.json" "$w/pulled/sbom.json" || fail "oras pull returned a different sbom.json"
    echo "  ok: oras pull gives back sbom.json byte for byte"
    expect_eq "status of the chunked-upload artifact push" 201 "$(jq -r .chunked.status "$w/result.json")"
    cmp "$w/big.bin" "$w/pulled/big.bin" || fail "oras pull returned a different big.bin (pushed in 1 MB chunks)"
    echo "  ok: a 3 MB file pushed in 1 MB chunks comes back byte for byte"

    # referrers API, unfiltered
    local url=http://$REG/v2/oras/img/referrers/$IMG_DIGEST
    curl -sS -u "$ADMIN" -D "$w/h0" -o "$w/r0.json" "$url"
    cat "$w/h0" "$w/r0.json"; echo
    expect_eq "referrers status" 200 "$(awk 'NR == 1 { print $2 }' "$w/h0")"
    expect_contains "referrers Content-Type" "$(tr -d '\r' <"$w/h0" | grep -i '^content-type:')" application/vnd.oci.image.index.v1+json
    expect_eq "referrers (digest artifactType)" \
        "$sbom application/vnd.example.sbom sbom
$sig application/vnd.example.signature signature" \
        "$(jq -r '.manifests[] | "\(.digest) \(.artifactType) \(.annotations["org.example.kind"])"' "$w/r0.json" | sort -k2)"
    expect_eq "size of the SBOM descriptor" "$(head_header "$REG" oras/img "$sbom" Content-Length)" \
        "$(jq -r --arg d "$sbom" '.manifests[] | select(.digest == $d) | .size' "$w/r0.json")"

    # filtered
    curl -sS -u "$ADMIN" -D "$w/h1" -o "$w/r1.json" "$url?artifactType=application/vnd.example.signature"
    cat "$w/h1" "$w/r1.json"; echo
    expect_eq "referrers?artifactType=application/vnd.example.signature" "$sig" "$(jq -r '.manifests[].digest' "$w/r1.json")"
    expect_contains "OCI-Filters-Applied" "$(tr -d '\r' <"$w/h1" | grep -i '^oci-filters-applied:' || true)" artifactType
    curl -sS -u "$ADMIN" -f -o "$w/r2.json" "$url?artifactType=application/vnd.example.sbom"
    expect_eq "referrers?artifactType=application/vnd.example.sbom" "$sbom" "$(jq -r '.manifests[].digest' "$w/r2.json")"
    curl -sS -u "$ADMIN" -f -o "$w/r3.json" "$url?artifactType=application/vnd.example.none"
    expect_eq "referrers?artifactType=<no match>" 0 "$(jq '.manifests | length' "$w/r3.json")"

    # a subject nobody refers to: 200 with an empty index, never 404 (distribution-spec)
    local other=sha256:0000000000000000000000000000000000000000000000000000000000000000
    curl -sS -u "$ADMIN" -D "$w/h4" -o "$w/r4.json" "http://$REG/v2/oras/img/referrers/$other"
    cat "$w/h4" "$w/r4.json"; echo
    expect_eq "referrers of an unknown digest: status" 200 "$(awk 'NR == 1 { print $2 }' "$w/h4")"
    expect_eq "referrers of an unknown digest: manifests" 0 "$(jq '.manifests | length' "$w/r4.json")"
}

check_umoci() {
    push_fixture img umoci/img:v1
    run skopeo copy -q --src-tls-verify=false --src-creds "$ADMIN" "docker://$REG/umoci/img:v1" "oci:$WORK/umoci-layout:v1"
    run umoci unpack --image "$WORK/umoci-layout:v1" "$WORK/umoci-bundle"
    expect_files "$WORK/umoci-bundle/rootfs" "$FIX" img
}

# ---------------------------------------------------------------------------------------
# access control: tokens with scope maps, created through the management API as admin

# api METHOD PATH [JSON] : admin call to /api/v1/PATH; prints the body, fails unless 2xx
api() {
    local out code
    out=$(curl -sS -u "$ADMIN" -X "$1" -H 'Content-Type: application/json' ${3:+--data "$3"} \
        -w '\n%{http_code}' "http://$REG/api/v1/$2") || fail "curl $1 /api/v1/$2 failed"
    code=${out##*$'\n'}
    out=${out%$'\n'*}
    case "$code" in 2??) ;; *) fail "$1 /api/v1/$2 $3: HTTP $code: $out" ;; esac
    echo "$out"
}

TOKENS=$WORK/tokens
# ensure_token NAME ACTION... : token NAME with its own scope map NAME-map holding ACTIONs
# (created once per run; password1 is kept in $TOKENS/NAME). Sets TOKEN_PW.
ensure_token() {
    local name=$1 resp
    shift
    mkdir -p "$TOKENS"
    if [ ! -s "$TOKENS/$name" ]; then
        api POST scope-maps "$(jq -cn --arg n "$name-map" '{name: $n, description: "outpost interop", actions: $ARGS.positional}' --args "$@")" >/dev/null
        resp=$(api POST tokens "$(jq -cn --arg n "$name" --arg m "$name-map" '{name: $n, scopeMap: $m}')")
        echo "created token $name: $(echo "$resp" | jq -c 'del(.passwords[].value)')"
        expect_eq "status of new token $name" enabled "$(echo "$resp" | jq -r .status)"
        echo "$resp" | jq -r '.passwords[] | select(.name == "password1") | .value' >"$TOKENS/$name"
        [ -s "$TOKENS/$name" ] || fail "no password1 value in the token response: $resp"
    fi
    TOKEN_PW=$(cat "$TOKENS/$name")
}
RW_ACTIONS="repositories/team/*/content/read repositories/team/*/content/write repositories/team/*/metadata/read"
RO_ACTIONS="repositories/team/*/content/read repositories/team/*/metadata/read"

# ensure_team_app : team/app:v1 exists (pushed as admin unless an earlier check pushed it);
# prints its digest
ensure_team_app() {
    local digest
    digest=$(head_header "$REG" team/app v1 Docker-Content-Digest 2>/dev/null || true)
    if [ -z "$digest" ]; then
        push_fixture img team/app:v1 >&2
        digest=$IMG_DIGEST
    fi
    echo "$digest"
}

DENIED_TEXT="requested access to the resource is denied"

check_anonymous_pull_registry() {
    # a second Outpost with anonymous_pull = true: clients with credentials still push, and
    # clients without any pull
    local port anon pw out
    port=$(free_port)
    anon=127.0.0.1:$port
    pw=$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    spawn outpost-anon "$LOGS/outpost-anon.log" env "${unset_outpost[@]}" \
        OUTPOST_ADMIN_PASSWORD="$pw" OUTPOST_ANONYMOUS_PULL=true \
        "$OUTPOST" serve --listen "$anon" --data-dir "$WORK/outpost-anon-data"
    wait_until 30 curl -sf -u "admin:$pw" "http://$anon/v2/" ||
        fail "the anonymous-pull registry did not answer within 30s"
    run skopeo copy -q --dest-tls-verify=false --dest-creds "admin:$pw" "oci:$FIX:img" "docker://$anon/open/app:v1" ||
        fail "skopeo could not push with credentials to a registry that allows anonymous pulls"
    out=$($T skopeo inspect --raw --tls-verify=false "docker://$anon/open/app:v1" 2>&1) ||
        fail "skopeo could not pull anonymously: $out"
    echo "  ok: pushed with credentials, inspected without"
    out=$($T skopeo copy -q --dest-tls-verify=false "oci:$FIX:img" "docker://$anon/open/app:v2" 2>&1) &&
        fail "an anonymous push succeeded: $out"
    echo "anonymous push: $out"
    # (the layers are there already, so it is the manifest that is refused)
    expect_contains "anonymous push" "$out" "unauthorized"
}

check_auth_anonymous() {
    local h out
    h=$(curl -sS -D - -o "$WORK/anon.json" "http://$REG/v2/" | tr -d '\r')
    echo "$h"; cat "$WORK/anon.json"; echo
    expect_eq "status of GET /v2/ without credentials" 401 "$(echo "$h" | awk 'NR == 1 { print $2 }')"
    expect_contains "WWW-Authenticate of GET /v2/" "$(echo "$h" | grep -i '^www-authenticate:')" \
        "Bearer realm=\"http://$REG/oauth2/token\",service=\"outpost\""
    expect_eq "error code" UNAUTHORIZED "$(jq -r '.errors[0].code' "$WORK/anon.json")"
    # a repository request: the challenge names the scope a client must ask for
    h=$(curl -sS -D - -o /dev/null "http://$REG/v2/team/app/manifests/v1" | tr -d '\r')
    echo "$h"
    expect_contains "WWW-Authenticate of GET /v2/team/app/manifests/v1" \
        "$(echo "$h" | grep -i '^www-authenticate:')" 'scope="repository:team/app:pull"'
    # anonymous token requests give no token
    expect_eq "status of an anonymous GET /oauth2/token" 401 \
        "$(curl -s -o /dev/null -w '%{http_code}' "http://$REG/oauth2/token?service=outpost&scope=repository:team/app:pull")"
    ensure_team_app >/dev/null
    out=$($T skopeo inspect --tls-verify=false "docker://$REG/team/app:v1" 2>&1) &&
        fail "skopeo inspect without credentials succeeded: $out"
    echo "skopeo inspect without credentials: $out"
    expect_contains "skopeo inspect without credentials" "$out" "authentication required"
    out=$($T skopeo inspect --tls-verify=false --creds "admin:wrong-$ADMIN_PW" "docker://$REG/team/app:v1" 2>&1) &&
        fail "skopeo inspect with a wrong password succeeded: $out"
    echo "skopeo inspect with a wrong password: $out"
    expect_contains "skopeo inspect with a wrong password" "$out" "incorrect username or password"
    expect_eq "status of the management API without credentials" 401 \
        "$(curl -s -o /dev/null -w '%{http_code}' "http://$REG/api/v1/tokens")"
}

check_auth_scoped_token_podman() {
    mkdir -p "$WORK/podman/tmp"
    ensure_token team-rw $RW_ACTIONS
    local auth=$WORK/podman/team-rw-auth.json pw=$TOKEN_PW
    echo '{}' >"$auth"
    podman_login team-rw "$pw" --authfile "$auth"
    expect_contains "podman auth file" "$(cat "$auth")" "\"$REG\""
    # the token can neither use the management API nor list what it cannot read
    expect_eq "status of GET /api/v1/tokens as team-rw" 403 \
        "$(curl -s -o /dev/null -u "team-rw:$pw" -w '%{http_code}' "http://$REG/api/v1/tokens")"
    cd "$WORK"
    local id pushed out
    id=$($T $PODMAN pull -q oci:fixtures:img | tail -n1) # (prints the image ID)
    expect_eq "image ID podman loaded from the fixture" \
        "$(jq -r .config.digest "$(layout_blob "$FIX" "$IMG_DIGEST")")" "sha256:${id#sha256:}"
    run $PODMAN tag "$id" "$REG/team/app:v1" "$REG/other/app:v1"
    run $PODMAN push --authfile "$auth" --tls-verify=false --digestfile "$WORK/podman/team-digest" "$REG/team/app:v1"
    pushed=$(cat "$WORK/podman/team-digest")
    expect_manifest "$REG" team/app v1 "$pushed"
    run $PODMAN rmi -f "$REG/team/app:v1"
    run $PODMAN pull --authfile "$auth" --tls-verify=false "$REG/team/app:v1"
    expect_eq "digest after podman pull with team-rw" "$pushed" \
        "$($PODMAN image inspect --format '{{.Digest}}' "$REG/team/app:v1")"
    out=$($T $PODMAN push --authfile "$auth" --tls-verify=false "$REG/other/app:v1" 2>&1) &&
        fail "podman push to other/app with a team/* token succeeded: $out"
    echo "podman push to other/app with team-rw: $out"
    # podman first asks HEAD /v2/other/app/blobs/<digest> (a HEAD answer has no body, so
    # podman can only report its status) before it would upload
    expect_contains "podman push to other/app" "$out" "other/app: 403 (Forbidden)"
    # the same refusal with its message, as a client sees it on a request with a body
    out=$(curl -sS -u "team-rw:$pw" -X POST "http://$REG/v2/other/app/blobs/uploads/")
    echo "POST /v2/other/app/blobs/uploads/ as team-rw: $out"
    expect_eq "error code" DENIED "$(echo "$out" | jq -r '.errors[0].code')"
    expect_contains "error message" "$out" "token \\\"team-rw\\\" does not have content/write on repository \\\"other/app\\\" (insufficient scopes)"
    expect_eq "status of HEAD other/app:v1 as admin (nothing was pushed)" 404 \
        "$(curl -s -o /dev/null -I -u "$ADMIN" -w '%{http_code}' "http://$REG/v2/other/app/manifests/v1")"
    run $PODMAN rmi -f "$REG/team/app:v1" "$REG/other/app:v1"
}

check_auth_readonly_token_skopeo() {
    ensure_token team-ro $RO_ACTIONS
    local pw=$TOKEN_PW digest out
    digest=$(ensure_team_app)
    run skopeo copy -q --src-tls-verify=false --src-creds "team-ro:$pw" "docker://$REG/team/app:v1" "oci:$WORK/ro-layout:v1"
    expect_eq "digest in the layout pulled with team-ro" "$digest" "$(layout_digest "$WORK/ro-layout" v1)"
    expect_eq "skopeo list-tags with team-ro" v1 \
        "$($T skopeo list-tags --tls-verify=false --creds "team-ro:$pw" "docker://$REG/team/app" | jq -r '.Tags | join(",")')"
    out=$($T skopeo copy -q --dest-tls-verify=false --dest-creds "team-ro:$pw" "oci:$WORK/ro-layout:v1" "docker://$REG/team/new:v1" 2>&1) &&
        fail "skopeo copy to team/new with a read-only token succeeded: $out"
    echo "what skopeo says for a push with the read-only token:"
    echo "$out"
    expect_contains "skopeo copy with team-ro" "$out" "$DENIED_TEXT"
    # (skopeo's log line escapes the quotes of the registry's message)
    expect_contains "skopeo copy with team-ro" "${out//\\\"/\"}" \
        'token "team-ro" does not have content/write on repository "team/new" (insufficient scopes)'
    out=$($T skopeo delete --tls-verify=false --creds "team-ro:$pw" "docker://$REG/team/app:v1" 2>&1) &&
        fail "skopeo delete with a read-only token succeeded: $out"
    echo "skopeo delete with team-ro: $out"
    expect_contains "skopeo delete with team-ro" "$out" "$DENIED_TEXT"
    expect_eq "team/app:v1 after the refused delete" "$digest" "$(head_header "$REG" team/app v1 Docker-Content-Digest)"
    expect_eq "status of HEAD team/new:v1 as admin (nothing was pushed)" 404 \
        "$(curl -s -o /dev/null -I -u "$ADMIN" -w '%{http_code}' "http://$REG/v2/team/new/manifests/v1")"
    # and nothing outside team/*
    out=$($T skopeo inspect --tls-verify=false --creds "team-ro:$pw" "docker://$REG/outside/img:v1" 2>&1) &&
        fail "skopeo inspect of outside/img with a team/* token succeeded: $out"
    echo "skopeo inspect of outside/img with team-ro: $out"
    expect_contains "skopeo inspect of outside/img with team-ro" "$out" "$DENIED_TEXT"
}

check_auth_catalog_filtered() {
    ensure_token team-ro $RO_ACTIONS
    local pw=$TOKEN_PW all ro
    ensure_team_app >/dev/null
    push_fixture img outside/img:v1
    all=$(curl -sS -f -u "$ADMIN" "http://$REG/v2/_catalog?n=1000" | jq -r '.repositories | join(",")')
    echo "catalog as admin: $all"
    expect_contains "catalog as admin" ",$all," ",outside/img,"
    expect_contains "catalog as admin" ",$all," ",team/app,"
    ro=$(curl -sS -f -u "team-ro:$pw" "http://$REG/v2/_catalog?n=1000" | jq -r '.repositories | join(",")')
    echo "catalog as team-ro: $ro"
    expect_eq "catalog as team-ro" \
        "$(echo "$all" | tr ',' '\n' | grep '^team/' | paste -sd, -)" "$ro"
}

check_auth_disabled_token() {
    mkdir -p "$WORK/podman/tmp"
    ensure_token team-tmp $RO_ACTIONS
    local pw=$TOKEN_PW out auth=$WORK/podman/team-tmp-auth.json
    ensure_team_app >/dev/null
    echo '{}' >"$auth"
    podman_login team-tmp "$pw" --authfile "$auth"
    run skopeo inspect --tls-verify=false --creds "team-tmp:$pw" "docker://$REG/team/app:v1"
    out=$(api PATCH tokens/team-tmp '{"status":"disabled"}')
    echo "PATCH tokens/team-tmp: $out"
    expect_eq "status after PATCH" disabled "$(echo "$out" | jq -r .status)"
    out=$(echo "$pw" | $T $PODMAN login --authfile "$auth" --tls-verify=false -u team-tmp --password-stdin "$REG" 2>&1) &&
        fail "podman login with a disabled token succeeded: $out"
    echo "podman login with the disabled token: $out"
    expect_contains "podman login with the disabled token" "$out" "invalid username/password"
    out=$($T skopeo inspect --tls-verify=false --creds "team-tmp:$pw" "docker://$REG/team/app:v1" 2>&1) &&
        fail "skopeo inspect with a disabled token succeeded: $out"
    echo "skopeo inspect with the disabled token: $out"
    expect_contains "skopeo inspect with the disabled token" "$out" "unauthorized"
    # podman's stored login from before no longer works either
    out=$($T $PODMAN pull --authfile "$auth" --tls-verify=false "$REG/team/app:v1" 2>&1) &&
        fail "podman pull with a disabled token succeeded: $out"
    echo "podman pull with the disabled token: $out"
    expect_contains "podman pull with the disabled token" "$out" "unauthorized"
    local h
    h=$(curl -sS -D - -o "$WORK/disabled.json" -u "team-tmp:$pw" "http://$REG/v2/" | tr -d '\r')
    echo "$h"; cat "$WORK/disabled.json"; echo
    expect_eq "status of GET /v2/ with the disabled token" 401 "$(echo "$h" | awk 'NR == 1 { print $2 }')"
    expect_eq "status of GET /oauth2/token with the disabled token" 401 \
        "$(curl -s -o /dev/null -u "team-tmp:$pw" -w '%{http_code}' "http://$REG/oauth2/token?service=outpost&scope=repository:team/app:pull")"
    # enabled again with a new password1: the old one is dead, the new one works
    api PATCH tokens/team-tmp '{"status":"enabled"}' >/dev/null
    out=$(api POST tokens/team-tmp/credentials/generate '{"passwords":["password1"]}')
    local newpw
    newpw=$(echo "$out" | jq -r '.passwords[] | select(.name == "password1") | .value')
    [ -n "$newpw" ] && [ "$newpw" != null ] && [ "$newpw" != "$pw" ] || fail "no new password1 in: $out"
    expect_eq "status of GET /v2/ with the replaced password" 401 \
        "$(curl -s -o /dev/null -u "team-tmp:$pw" -w '%{http_code}' "http://$REG/v2/")"
    run skopeo inspect --tls-verify=false --creds "team-tmp:$newpw" "docker://$REG/team/app:v1"
}

check_auth_containerd_token() {
    ensure_containerd
    ensure_token team-rw $RW_ACTIONS
    local pw=$TOKEN_PW digest out before
    digest=$(ensure_team_app)
    before=$(wc -l <"$LOGS/outpost.log")
    local ns="ctr --address $CTD_SOCK --namespace outpost-interop-auth"
    run $ns images pull --plain-http --user "team-rw:$pw" "$REG/team/app:v1"
    expect_eq "digest in ctr images ls" "$digest" "$($ns images ls "name==$REG/team/app:v1" | awk 'NR == 2 { print $3 }')"
    # containerd asks for its token with the OAuth2 password grant (POST /oauth2/token)
    local posts
    posts=$(tail -n +$((before + 1)) "$LOGS/outpost.log" | grep -c 'method=POST path=/oauth2/token status=200' || true)
    [ "$posts" -gt 0 ] || fail "no successful POST /oauth2/token in outpost's log during ctr pull"
    echo "  ok: $posts POST /oauth2/token answered 200 during ctr pull"
    # push inside team/* works, outside is refused
    run $ns images tag "$REG/team/app:v1" "$REG/team/ctr:v1" "$REG/other/ctr:v1"
    run $ns images push --plain-http --user "team-rw:$pw" "$REG/team/ctr:v1"
    expect_eq "Docker-Content-Digest of team/ctr:v1" "$digest" "$(head_header "$REG" team/ctr v1 Docker-Content-Digest)"
    out=$($T $ns images push --plain-http --user "team-rw:$pw" "$REG/other/ctr:v1" 2>&1) &&
        fail "ctr push to other/ctr with a team/* token succeeded: $out"
    echo "ctr push to other/ctr with team-rw: $out"
    expect_contains "ctr push to other/ctr" "$out" "403 Forbidden"
    out=$($T $ns images pull --plain-http --user "team-rw:wrong-$pw" "$REG/team/app:v1" 2>&1) &&
        fail "ctr pull with a wrong password succeeded: $out"
    echo "ctr pull with a wrong password: $out"
    expect_contains "ctr pull with a wrong password" "$out" "401 Unauthorized"
}

# outpost_cli ARGS... : the outpost CLI (same binary) against $REG as the administrator,
# with none of the caller's OUTPOST_* variables
outpost_cli() {
    echo "+ outpost $*" >&2
    $T env "${unset_outpost[@]}" "$OUTPOST" "$@" --registry "http://$REG" --username admin --password "$ADMIN_PW"
}

# site_has TAG DIGEST : the site ($SITE) serves DIGEST for sync/app:TAG to its client token
site_has() {
    local hex
    hex=$(timeout 20 skopeo inspect --raw --tls-verify=false --creds "$SITE_CLIENT" \
        "docker://$SITE/sync/app:$1" 2>/dev/null | sha256sum | cut -d' ' -f1) || return 1
    [ "sha256:$hex" = "$2" ]
}

site_online() { # the root reports site-interop's connectionState as Online
    outpost_cli connected-registry show -n site-interop -o json | jq -e '.connectionState == "Online"'
}

# A second Outpost runs as a connected registry (site) of the suite's Outpost (the root) and
# follows sync/app: what is pushed at the root reaches the site, which serves it to its client
# token and refuses pushes.
# A full disk stops the metadata database in the middle of a write. Once the operator frees
# space, pushes must be stored for real, without a restart: after a write was refused for
# want of space, sqlx used to run every later write as a savepoint inside the failed
# transaction (answered 201, never committed, lost at restart). A loop-mounted 64 MiB ext4
# reproduces it; tmpfs does not (it refuses writes at once, ext4 at write-back).
check_full_disk_recovery() {
    local dir=$WORK/fulldisk port reg pw i cfg layer cd ld m status t1
    mkdir -p "$dir/mnt"
    truncate -s 64M "$dir/img"
    mkfs.ext4 -q -m 0 "$dir/img"
    mount -o loop "$dir/img" "$dir/mnt"
    # shellcheck disable=SC2064 # the path is fixed now; the variable is gone when it runs
    trap "umount -l '$dir/mnt' 2>/dev/null || true" EXIT
    head -c 8M /dev/zero >"$dir/mnt/ballast" # what the operator frees later
    port=$(free_port)
    reg=127.0.0.1:$port
    pw=$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    spawn outpost-fulldisk "$LOGS/outpost-fulldisk.log" env "${unset_outpost[@]}" \
        OUTPOST_ADMIN_PASSWORD="$pw" "$OUTPOST" serve --listen "$reg" --data-dir "$dir/mnt/data"
    local server=$!
    wait_until 30 curl -sf -u "admin:$pw" "http://$reg/v2/" || fail "the server did not start"
    local put=(curl -s -o /dev/null -w '%{http_code}' -u "admin:$pw" -X PUT
        -H 'Content-Type: application/vnd.oci.image.manifest.v1+json')
    # images of one 4 MB random layer until the disk is full
    for i in $(seq 0 40); do
        cfg=$dir/config-$i.json layer=$dir/layer-$i
        printf '{"image":%d}' "$i" >"$cfg"
        head -c 4000000 /dev/urandom >"$layer"
        cd=sha256:$(sha256sum "$cfg" | cut -c1-64) ld=sha256:$(sha256sum "$layer" | cut -c1-64)
        status=$(curl -s -o /dev/null -w '%{http_code}' -u "admin:$pw" --data-binary "@$layer" \
            "http://$reg/v2/fill/blobs/uploads/?digest=$ld")
        rm -f "$layer"
        [ "$status" = 201 ] || break
        curl -sf -o /dev/null -u "admin:$pw" --data-binary "@$cfg" "http://$reg/v2/fill/blobs/uploads/?digest=$cd"
        m=$dir/manifest-$i.json
        printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":4000000}]}' \
            "$cd" "$(stat -c %s "$cfg")" "$ld" >"$m"
        expect_eq "PUT fill:t$i" 201 "$("${put[@]}" --data-binary "@$m" "http://$reg/v2/fill/manifests/t$i")"
    done
    expect_eq "the first blob refused once the disk is full" 507 "$status"
    [ -f "$dir/manifest-1.json" ] || fail "fewer than two images fit on the disk"
    # tags until the database itself is refused
    for i in $(seq 1 3000); do
        status=$("${put[@]}" --data-binary "@$dir/manifest-0.json" "http://$reg/v2/fill/manifests/x$i")
        [ "$status" = 201 ] || break
    done
    expect_eq "a tag refused once the database is full" 507 "$status"
    t1=sha256:$(sha256sum "$dir/manifest-1.json" | cut -c1-64)
    # Deleting is how room is made: it goes through on the full disk (the data directory's
    # reserve is released for it), and it sticks.
    expect_eq "a delete while the disk is full" 202 \
        "$(curl -s -o /dev/null -w '%{http_code}' -u "admin:$pw" -X DELETE "http://$reg/v2/fill/manifests/$t1")"
    expect_eq "the deleted image, read back" 404 \
        "$(curl -s -o /dev/null -w '%{http_code}' -u "admin:$pw" -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$reg/v2/fill/manifests/$t1")"
    rm "$dir/mnt/ballast"
    expect_eq "a push once space is freed" 201 \
        "$("${put[@]}" --data-binary "@$dir/manifest-0.json" "http://$reg/v2/fill/manifests/after")"
    expect_eq "that push, read back" 200 \
        "$(curl -s -o /dev/null -w '%{http_code}' -u "admin:$pw" -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$reg/v2/fill/manifests/after")"
    kill "$server"
    wait_until 20 sh -c "! kill -0 $server" || true
}

check_sync_root_to_site() {
    local out cs sitepw port data digest
    # client token first, so that the connected registry can list it
    out=$(outpost_cli token create -n site-puller --repository sync/app content/read metadata/read -o json)
    echo "token site-puller: $(echo "$out" | jq -c 'del(.passwords[].value)')"
    SITE_CLIENT=site-puller:$(echo "$out" | jq -r '.passwords[0].value')
    [ "$SITE_CLIENT" != site-puller:null ] || fail "no password in: $out"
    outpost_cli connected-registry create -n site-interop --repository sync/app --client-tokens site-puller
    cs=$(outpost_cli connected-registry get-settings -n site-interop --parent-protocol http --generate-password 1 --yes -o tsv)
    echo "connection string: $(echo "$cs" | sed 's/SyncTokenPassword=[^;]*/SyncTokenPassword=.../')"
    expect_contains "connection string" "$cs" "ConnectedRegistryName=site-interop;"

    push_fixture multi sync/app:v1 --all
    expect_manifest "$REG" sync/app v1 "$MULTI_DIGEST"

    port=$(free_port)
    SITE=127.0.0.1:$port
    data=$WORK/outpost-site-data
    sitepw=$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    spawn outpost-site "$LOGS/outpost-site.log" env "${unset_outpost[@]}" \
        OUTPOST_ADMIN_PASSWORD="$sitepw" OUTPOST_SYNC_POLL_SECS=5 \
        "$OUTPOST" serve --listen "$SITE" --data-dir "$data" --connection-string "$cs" \
        --log-level "${INTEROP_OUTPOST_LOG_LEVEL:-debug,sqlx=warn}"
    # (the check's log, shown if it fails, ends with the site's)
    trap 'echo "--- site log (last 60 lines):"; tail -n 60 "$LOGS/outpost-site.log"' EXIT
    wait_until 30 grep -q 'outpost listening addr=' "$LOGS/outpost-site.log" ||
        fail "the site did not log 'outpost listening' within 30s"
    wait_until 30 grep -q 'activated at the parent' "$LOGS/outpost-site.log" ||
        fail "the site did not log 'activated at the parent' within 30s"
    echo "  ok: the site listens on $SITE and was activated at the root"

    # what was pushed before the site started
    wait_until 30 timeout 20 skopeo inspect --raw --tls-verify=false --creds "$SITE_CLIENT" "docker://$SITE/sync/app:v1" ||
        fail "sync/app:v1 did not reach the site within 30s"
    digest=sha256:$($T skopeo inspect --raw --tls-verify=false --creds "$SITE_CLIENT" "docker://$SITE/sync/app:v1" | sha256sum | cut -d' ' -f1)
    expect_eq "sha256 of the bytes skopeo gets for sync/app:v1 at the site" "$MULTI_DIGEST" "$digest"
    run skopeo copy -q --all --src-tls-verify=false --src-creds "$SITE_CLIENT" "docker://$SITE/sync/app:v1" "oci:$WORK/site-multi:v1"
    expect_eq "digest in the layout pulled from the site" "$MULTI_DIGEST" "$(layout_digest "$WORK/site-multi" v1)"
    same_blobs "$FIX" "$WORK/site-multi" 9 # index, 2 x (manifest, config, 2 layers)

    # what is pushed while the site runs
    push_fixture img sync/app:v2
    wait_until 30 site_has v2 "$IMG_DIGEST" ||
        fail "sync/app:v2 ($IMG_DIGEST) did not reach the site within 30s"
    echo "  ok: sync/app:v2 reached the site as $IMG_DIGEST"

    # the site is read-only
    out=$($T skopeo copy -q --dest-tls-verify=false --dest-creds "admin:$sitepw" "oci:$FIX:img" "docker://$SITE/sync/app:v3" 2>&1) &&
        fail "skopeo copy to the read-only site succeeded: $out"
    echo "skopeo copy to the site: $out"
    expect_contains "skopeo copy to the site" "$out" "read-only"
    out=$(timeout 20 skopeo inspect --raw --tls-verify=false --creds "admin:$sitepw" "docker://$SITE/sync/app:v3" 2>&1) &&
        fail "sync/app:v3 exists at the site after the refused push: $out"
    echo "  ok: no sync/app:v3 at the site"

    # the root sees the site online
    wait_until 30 site_online || true
    out=$(outpost_cli connected-registry show -n site-interop -o json)
    echo "connected-registry show: $out"
    expect_eq "connectionState of site-interop at the root" Online "$(echo "$out" | jq -r .connectionState)"

    # and the site is healthy: up, no ERROR, no 5xx, no panic
    kill -0 "$(awk '$2 == "outpost-site" { print $1 }' "$PIDFILE")" 2>/dev/null || fail "the site is no longer running"
    out=$(grep -E '^[^ ]+ +ERROR |status=5[0-9][0-9]|panicked' "$LOGS/outpost-site.log" || true)
    [ -z "$out" ] || fail "the site logged errors or 5xx responses:
$(echo "$out" | head -n 30)"
    echo "  ok: the site logged no ERROR, 5xx or panic"
}

# node_healthy NAME LOG : the spawned Outpost NAME is up and logged no ERROR, 5xx or panic
node_healthy() {
    local out
    kill -0 "$(awk -v n="$1" '$2 == n { print $1 }' "$PIDFILE")" 2>/dev/null || fail "$1 is no longer running"
    out=$(grep -E '^[^ ]+ +ERROR |status=5[0-9][0-9]|panicked' "$2" || true)
    [ -z "$out" ] || fail "$1 logged errors or 5xx responses:
$(echo "$out" | head -n 30)"
    echo "  ok: $1 logged no ERROR, 5xx or panic"
}

root_shows() { # NAME TEXT : the root's `connected-registry show NAME` mentions TEXT
    outpost_cli connected-registry show -n "$1" -o json | grep -qF "$2"
}

serves() { # HOST TAG DIGEST : HOST serves DIGEST for sync/app:TAG to the client token
    local hex
    hex=$(timeout 20 skopeo inspect --raw --tls-verify=false --creds "$SITE_CLIENT" \
        "docker://$1/sync/app:$2" 2>/dev/null | sha256sum | cut -d' ' -f1) || return 1
    [ "sha256:$hex" = "$3" ]
}

# Three levels: the root, a ReadWrite site (mid-interop) as a separate Outpost, and a ReadOnly
# line (leaf-interop) below it, also separate. skopeo pulls from the leaf what was pushed at
# the root, byte for byte, and a tag pushed at the root later reaches the leaf through the site.
check_sync_root_to_leaf() {
    local out cs_mid cs_leaf mid_pw leaf_pw mid leaf
    # (each check runs in its own subshell: this one makes its own client token)
    out=$(outpost_cli token create -n leaf-puller --repository sync/app content/read metadata/read -o json)
    SITE_CLIENT=leaf-puller:$(echo "$out" | jq -r '.passwords[0].value')
    [ "$SITE_CLIENT" != leaf-puller:null ] || fail "no password in: $out"
    outpost_cli connected-registry create -n mid-interop -m ReadWrite --repository sync/app
    outpost_cli connected-registry create -n leaf-interop -p mid-interop --repository sync/app --client-tokens leaf-puller
    cs_mid=$(outpost_cli connected-registry get-settings -n mid-interop --parent-protocol http --generate-password 1 --yes -o tsv)
    mid=127.0.0.1:$(free_port)
    mid_pw=$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    spawn outpost-mid "$LOGS/outpost-mid.log" env "${unset_outpost[@]}" \
        OUTPOST_ADMIN_PASSWORD="$mid_pw" OUTPOST_SYNC_POLL_SECS=5 \
        "$OUTPOST" serve --listen "$mid" --data-dir "$WORK/outpost-mid-data" --connection-string "$cs_mid" \
        --log-level "${INTEROP_OUTPOST_LOG_LEVEL:-debug,sqlx=warn}"
    trap 'echo "--- mid log (last 40 lines):"; tail -n 40 "$LOGS/outpost-mid.log"; echo "--- leaf log (last 40 lines):"; tail -n 40 "$LOGS/outpost-leaf.log" 2>/dev/null' EXIT
    # the leaf's parent endpoint is the site's login server, known once the site reported it
    wait_until 30 root_shows mid-interop "$mid" ||
        fail "the root did not learn mid-interop's address ($mid) within 30s"
    cs_leaf=$(outpost_cli connected-registry get-settings -n leaf-interop --parent-protocol http --generate-password 1 --yes -o tsv)
    expect_contains "leaf connection string" "$cs_leaf" "ParentGatewayEndpoint=$mid;"
    # the site learns the leaf's new password at its next configuration fetch
    leaf_pw=$(echo "$cs_leaf" | tr ';' '\n' | sed -n 's/^SyncTokenPassword=//p')
    wait_until 30 curl -sf -u "leaf-interop:$leaf_pw" "http://$mid/gateway/v1/leaf-interop/config" ||
        fail "mid-interop did not accept leaf-interop's new password within 30s"
    leaf=127.0.0.1:$(free_port)
    spawn outpost-leaf "$LOGS/outpost-leaf.log" env "${unset_outpost[@]}" \
        OUTPOST_ADMIN_PASSWORD="$mid_pw" OUTPOST_SYNC_POLL_SECS=5 \
        "$OUTPOST" serve --listen "$leaf" --data-dir "$WORK/outpost-leaf-data" --connection-string "$cs_leaf" \
        --log-level "${INTEROP_OUTPOST_LOG_LEVEL:-debug,sqlx=warn}"
    wait_until 30 grep -q 'activated at the parent' "$LOGS/outpost-leaf.log" ||
        fail "the leaf did not log 'activated at the parent' within 30s"

    # what the root held before: the multi-platform index, pulled whole from the leaf
    wait_until 30 timeout 20 skopeo inspect --raw --tls-verify=false --creds "$SITE_CLIENT" "docker://$leaf/sync/app:v1" ||
        fail "sync/app:v1 did not reach the leaf within 30s"
    run skopeo copy -q --all --src-tls-verify=false --src-creds "$SITE_CLIENT" "docker://$leaf/sync/app:v1" "oci:$WORK/leaf-multi:v1"
    expect_eq "digest in the layout pulled from the leaf" "$MULTI_DIGEST" "$(layout_digest "$WORK/leaf-multi" v1)"
    same_blobs "$FIX" "$WORK/leaf-multi" 9
    # pushed at the root now: through the site to the leaf
    push_fixture img sync/app:leaf-v1
    wait_until 30 serves "$leaf" leaf-v1 "$IMG_DIGEST" ||
        fail "sync/app:leaf-v1 ($IMG_DIGEST) did not reach the leaf within 30s"
    echo "  ok: sync/app:leaf-v1 reached the leaf as $IMG_DIGEST"
    node_healthy outpost-mid "$LOGS/outpost-mid.log"
    node_healthy outpost-leaf "$LOGS/outpost-leaf.log"
}

# Two replicas of one registry (metadata in PostgreSQL at TEST_POSTGRES_URL, which test.sh
# starts; blobs in moto's S3) behind a round-robin load balancer: skopeo pushes a multi-layer
# image and an index through it and pulls them back with identical digests, and each replica
# serves them. Uploads that land on the other replica are forwarded to the one holding them.
check_replicas_behind_a_load_balancer() {
    [ -n "${TEST_POSTGRES_URL:-}" ] ||
        fail "TEST_POSTGRES_URL is not set (./test.sh starts PostgreSQL for the tests)"
    local moto=${MOTO_SERVER:-$HERE/../../.venv/bin/moto_server} s3 db lb a b pa pb r
    s3=$(free_port)
    spawn moto "$LOGS/moto.log" "$moto" -H 127.0.0.1 -p "$s3"
    wait_until 30 curl -s -o /dev/null "http://127.0.0.1:$s3" || fail "moto did not start"
    run curl -sf -X PUT "http://127.0.0.1:$s3/interop" -o /dev/null
    db=interop_$$_$RANDOM
    run psql -q "$TEST_POSTGRES_URL" -c "CREATE DATABASE $db"
    pa=$(free_port)
    pb=$(free_port)
    for r in "a $pa" "b $pb"; do
        set -- $r
        spawn "outpost-replica-$1" "$LOGS/outpost-replica-$1.log" env "${unset_outpost[@]}" \
            AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 \
            AWS_ENDPOINT="http://127.0.0.1:$s3" AWS_ALLOW_HTTP=true \
            OUTPOST_BLOB_STORE=s3://interop/fleet OUTPOST_DATABASE_URL="${TEST_POSTGRES_URL%/*}/$db" \
            OUTPOST_REPLICA_URL="http://127.0.0.1:$2" OUTPOST_ADMIN_PASSWORD="$ADMIN_PW" \
            "$OUTPOST" serve --listen "127.0.0.1:$2" --data-dir "$WORK/replica-$1" \
            --log-level "${INTEROP_OUTPOST_LOG_LEVEL:-debug,sqlx=warn}"
        wait_until 30 curl -sf -u "$ADMIN" "http://127.0.0.1:$2/v2/" || fail "replica $1 did not start"
    done
    lb=$(free_port)
    spawn roundrobin "$LOGS/roundrobin.log" python3 "$HERE/roundrobin.py" "$lb" "127.0.0.1:$pa" "127.0.0.1:$pb"
    wait_until 30 curl -sf -u "$ADMIN" "http://127.0.0.1:$lb/v2/" || fail "the load balancer did not start"
    LB=127.0.0.1:$lb
    ADMIN_HOSTS="$LB 127.0.0.1:$pa 127.0.0.1:$pb"

    run skopeo copy -q --dest-tls-verify=false --dest-creds "$ADMIN" "oci:$FIX:img" "docker://$LB/fleet/img:v1"
    run skopeo copy -q --all --dest-tls-verify=false --dest-creds "$ADMIN" "oci:$FIX:multi" "docker://$LB/fleet/multi:v1"
    echo "load balancer: $(grep -c '^connection to' "$LOGS/roundrobin.log") connections, $(grep -c ":$pa " "$LOGS/roundrobin.log") to A and $(grep -c ":$pb " "$LOGS/roundrobin.log") to B"
    for host in "$LB" "127.0.0.1:$pa" "127.0.0.1:$pb"; do
        expect_eq "fleet/img:v1 at $host" "$IMG_DIGEST" "$(raw_sha "docker://$host/fleet/img:v1")"
        expect_eq "fleet/multi:v1 at $host" "$MULTI_DIGEST" "$(raw_sha "docker://$host/fleet/multi:v1")"
    done
    run skopeo copy -q --all --src-tls-verify=false --src-creds "$ADMIN" "docker://$LB/fleet/multi:v1" "oci:$WORK/fleet-multi:v1"
    expect_eq "digest in the layout pulled through the load balancer" "$MULTI_DIGEST" "$(layout_digest "$WORK/fleet-multi" v1)"
    same_blobs "$FIX" "$WORK/fleet-multi" 9
    run skopeo copy -q --src-tls-verify=false --src-creds "$ADMIN" "docker://$LB/fleet/img:v1" "oci:$WORK/fleet-img:v1"
    expect_eq "digest of the image pulled through the load balancer" "$IMG_DIGEST" "$(layout_digest "$WORK/fleet-img" v1)"
    same_blobs "$FIX" "$WORK/fleet-img" 5
    for r in a b; do
        if grep -E 'status=5[0-9][0-9]|panicked' "$LOGS/outpost-replica-$r.log"; then
            fail "replica $r answered a 5xx or panicked (lines above)"
        fi
    done
    echo "  ok: no 5xx at either replica"
    # (how many uploads had requests at both replicas: forwarded; depends on skopeo's reuse
    # of connections, so only reported)
    comm -12 <(grep -o 'blobs/uploads/[0-9a-f-]\{36\}' "$LOGS/outpost-replica-a.log" | sort -u) \
        <(grep -o 'blobs/uploads/[0-9a-f-]\{36\}' "$LOGS/outpost-replica-b.log" | sort -u) |
        wc -l | xargs echo "uploads seen at both replicas (forwarded):"
}

# after all the clients: Outpost is still up, answered no request with a 5xx, logged no
# ERROR and did not panic (its request lines are "... request method=.. path=.. status=NNN")
check_outpost_after() {
    local pid bad
    pid=$(awk '$2 == "outpost" { print $1 }' "$PIDFILE")
    kill -0 "$pid" 2>/dev/null || fail "outpost (pid $pid) is no longer running: $(tail -n 20 "$LOGS/outpost.log")"
    expect_eq "GET /v2/ status" 200 "$(curl -s -u "$ADMIN" -o /dev/null -w '%{http_code}' "http://$REG/v2/")"
    bad=$(grep -E '^[^ ]+ +ERROR |status=5[0-9][0-9]|panicked' "$LOGS/outpost.log" || true)
    [ -z "$bad" ] || fail "outpost logged errors or 5xx responses:
$(echo "$bad" | head -n 30)"
    echo "  ok: $(grep -c 'request method=' "$LOGS/outpost.log" || true) requests, no 5xx, no ERROR"
}

# ---------------------------------------------------------------------------------------
# main

echo "outpost interop: $OUTPOST, work dir $WORK"
for tool in skopeo podman dockerd "$DOCKER" containerd ctr docker-registry umoci curl jq python3; do
    command -v "$tool" >/dev/null || { echo "missing tool: $tool (tests/deps.sh installs it)" >&2; exit 2; }
done

PORT=$(free_port)
REG=127.0.0.1:$PORT
# Outpost reads every OUTPOST_* variable as configuration and refuses unknown ones, so its
# environment gets none of the caller's: the flags below are its whole configuration.
unset_outpost=()
for v in $(compgen -e | grep '^OUTPOST_' || true); do unset_outpost+=(-u "$v"); done
# debug for one log line per request (shown when a check fails), without sqlx's statements
# OUTPOST_ADMIN_PASSWORD creates the administrator token `admin` on first start.
# It always begins with `-` (base64url does one time in 64): every client and `outpost
# --password` must take it as a value, not a flag.
ADMIN_PW=-$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
ADMIN=admin:$ADMIN_PW
spawn outpost "$LOGS/outpost.log" env "${unset_outpost[@]}" OUTPOST_ADMIN_PASSWORD="$ADMIN_PW" \
    "$OUTPOST" serve --listen "$REG" \
    --data-dir "$WORK/outpost-data" --log-level "${INTEROP_OUTPOST_LOG_LEVEL:-debug,sqlx=warn}"
if ! wait_until 30 curl -sf -u "$ADMIN" "http://$REG/v2/"; then
    echo "FAIL outpost-start: no 200 from http://$REG/v2/ within 30s"
    tail -n 40 "$LOGS/outpost.log" | sed 's/^/    | /'
    echo "0 passed, 1 failed"
    exit 1
fi

# fixtures: a 3-layer image (1 MiB random layers) and a 2-platform index
FIX=$WORK/fixtures
python3 "$HERE/mkimage.py" "$FIX" --layers 3 --layer-size 1048576 --tag img >/dev/null
python3 "$HERE/mkimage.py" "$FIX" --layers 2 --layer-size 65536 --platforms linux/amd64,linux/arm64 --tag multi >/dev/null
IMG_DIGEST=$(layout_digest "$FIX" img)
MULTI_DIGEST=$(layout_digest "$FIX" multi)

run_check skopeo-image-roundtrip check_skopeo_image
run_check skopeo-index-roundtrip-all check_skopeo_index
run_check skopeo-docker-manifest-list check_skopeo_docker_list
run_check skopeo-tags-and-catalog check_skopeo_tags
run_check skopeo-delete-and-errors check_skopeo_delete_and_errors
run_check docker-registry-from-outpost check_distribution_to
run_check docker-registry-to-outpost check_distribution_from
run_check podman-push-pull check_podman
run_check podman-manifest-list-push check_podman_manifest_list
run_check docker-login check_docker_login
run_check docker-push-pull check_docker_push_pull
run_check docker-pull-oci-index check_docker_pull_oci_index
run_check ctr-pull-image check_ctr_image
run_check ctr-pull-index-and-push check_ctr_index
run_check oras-referrers check_oras
run_check umoci-unpack check_umoci
run_check auth-anonymous-refused check_auth_anonymous
run_check auth-scoped-token-podman check_auth_scoped_token_podman
run_check auth-readonly-token-skopeo check_auth_readonly_token_skopeo
run_check auth-catalog-filtered check_auth_catalog_filtered
run_check auth-disabled-token check_auth_disabled_token
run_check auth-anonymous-pull-registry check_anonymous_pull_registry
run_check auth-containerd-token-flow check_auth_containerd_token
run_check sync-root-to-site-skopeo check_sync_root_to_site
run_check sync-root-to-leaf-skopeo check_sync_root_to_leaf

run_check replicas-behind-a-load-balancer check_replicas_behind_a_load_balancer
run_check full-disk-recovery check_full_disk_recovery
run_check outpost-healthy-after-run check_outpost_after
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
