#!/usr/bin/env bash
# Outpost's one test command: ./test.sh
#
#   1. cargo build --release --locked
#   2. cargo nextest run --workspace --release --locked   (unit, in-process and process tests)
#      and again for outpost-server with TEST_METADATA=postgres (every API test with the
#      metadata in PostgreSQL, on a private server tests/postgres.sh starts)
#   3. tests/interop/run.sh target/release/outpost        (real clients: skopeo, podman, docker,
#                                                           containerd, docker-registry, oras, umoci)
#   4. bench/hot_symbols.py --check target/release/outpost (build.rs's start-up code layout still
#                                                           matches the binary of step 1; run
#                                                           right after it, reported last)
#
# Run as root (as CI and the dev machines do), it first runs tests/deps.sh, which installs the
# Debian packages and the Python venv step 3 needs, and does nothing when they are there.
# INSTALL_TEST_DEPS=1 asks for that when not root, INSTALL_TEST_DEPS=0 skips it.
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" # dockerd, runc
cd "$(dirname "$0")"

install_deps=${INSTALL_TEST_DEPS:-}
# Outpost reads every OUTPOST_* variable as configuration and rejects unknown ones:
# don't hand this one down to the servers the tests start.
unset INSTALL_TEST_DEPS
if [ "$install_deps" = 1 ] || { [ "$(id -u)" = 0 ] && [ "$install_deps" != 0 ]; }; then
    tests/deps.sh
fi

if [ -z "${ORAS_PY:-}" ] && [ -x .venv/bin/python ]; then
    ORAS_PY=$PWD/.venv/bin/python
fi
export ORAS_PY=${ORAS_PY:-python3}

missing=()
for c in cargo skopeo podman dockerd /usr/bin/docker containerd ctr docker-registry umoci curl jq python3 pg_ctlcluster; do
    command -v "$c" >/dev/null 2>&1 || missing+=("$c")
done
if command -v cargo >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
    missing+=(cargo-nextest)
fi
"$ORAS_PY" -c 'import oras.client' >/dev/null 2>&1 || missing+=("python package oras (in ORAS_PY=$ORAS_PY)")
if [ "${SKIP_OBJECT_STORE_TESTS:-}" != 1 ]; then
    [ -x "${MOTO_SERVER:-.venv/bin/moto_server}" ] || missing+=("moto_server (moto's S3 server, in .venv)")
    [ -x "${AZURITE_BLOB:-.cache/azurite/node_modules/.bin/azurite-blob}" ] || missing+=("azurite-blob (npm azurite, in .cache/azurite)")
fi
if [ ${#missing[@]} -gt 0 ]; then
    {
        echo "test.sh: missing prerequisites:"
        printf '    %s\n' "${missing[@]}"
        echo "Install them with tests/deps.sh as root (CI's .ci/run does this by running ./test.sh as root)."
    } >&2
    exit 1
fi

target_dir=${CARGO_TARGET_DIR:-target}

# PostgreSQL for the tests that keep metadata there. SKIP_POSTGRES_TESTS=1 opts out (CI never
# does); a TEST_POSTGRES_URL already set is used as it is.
if [ "${SKIP_POSTGRES_TESTS:-}" != 1 ] && [ -z "${TEST_POSTGRES_URL:-}" ]; then
    pg_dir=$(mktemp -d /tmp/outpost-test-pg.XXXXXX)
    trap 'tests/postgres.sh stop "$pg_dir"; rm -rf "$pg_dir"' EXIT
    TEST_POSTGRES_URL=$(tests/postgres.sh start "$pg_dir")
    export TEST_POSTGRES_URL
    echo "== PostgreSQL for the tests at $TEST_POSTGRES_URL"
fi

echo "== cargo build --release --locked"
cargo build --release --locked

# Step 4 looks at step 1's binary: step 2 rebuilds it with the tests' features (other
# symbol hashes). It runs now and fails the run at the end, so it never hides the tests.
echo "== bench/hot_symbols.py --check $target_dir/release/outpost"
hot_layout=0
python3 bench/hot_symbols.py --check "$target_dir/release/outpost" || hot_layout=$?

echo "== cargo nextest run --workspace --release --locked"
cargo nextest run --workspace --release --locked

if [ "${SKIP_POSTGRES_TESTS:-}" != 1 ]; then
    echo "== cargo nextest run -p outpost-server --release --locked, metadata in PostgreSQL"
    TEST_METADATA=postgres cargo nextest run -p outpost-server --release --locked
else
    echo "== SKIPPED (SKIP_POSTGRES_TESTS=1): the API tests with metadata in PostgreSQL"
fi

echo "== tests/interop/run.sh $target_dir/release/outpost"
tests/interop/run.sh "$target_dir/release/outpost"

if [ "$hot_layout" != 0 ]; then
    echo "FAILED: bench/hot_symbols.py --check (see its message after the build above)" >&2
    exit "$hot_layout"
fi
