#!/usr/bin/env bash
# Install everything the test suite needs that a Debian 12 machine with the Rust toolchain
# (cargo, cargo-nextest) and python3 does not already have. Run as root. Idempotent:
# when every tool is already there it installs nothing (unless CI=true or DEPS_FORCE=1,
# which always run apt-get update + install).
#
#   Debian packages : the real registry clients and daemons tests/interop/run.sh drives,
#                     plus load tools for bench/
#   .venv/          : a Python venv with oras-py and moto (tests/interop/requirements.txt);
#                     test.sh points ORAS_PY at .venv/bin/python
#   .cache/azurite/ : azurite from npm (the Azure Blob Storage emulator)
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" # dockerd, runc
cd "$(dirname "$0")/.."
REPO=$PWD

PACKAGES=(
    skopeo podman buildah umoci   # containers/image clients, OCI layout tools
    docker.io containerd          # dockerd + docker CLI (/usr/bin/docker), containerd + ctr
    docker-registry               # distribution 2.8, the reference registry
    curl jq ca-certificates       # raw HTTP checks
    postgresql                    # metadata in PostgreSQL (tests/postgres.sh starts a private server)
    iperf3 wrk                    # bench/
    e2fsprogs                     # mkfs.ext4: the interop suite's small full disk (loop-mounted)
    faketime                      # libfaketime: a connected registry whose clock is wrong
)
# one command per package above, to tell whether it is installed
COMMANDS=(skopeo podman buildah umoci dockerd /usr/bin/docker containerd ctr docker-registry curl jq pg_ctlcluster iperf3 wrk mkfs.ext4 faketime)

missing=()
for c in "${COMMANDS[@]}"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done

if [ ${#missing[@]} -gt 0 ] || [ "${CI:-}" = true ] || [ "${DEPS_FORCE:-0}" = 1 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "tests/deps.sh: need root to install Debian packages (missing: ${missing[*]:-none})" >&2
        exit 1
    fi
    echo "tests/deps.sh: installing Debian packages: ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a NEEDRESTART_SUSPEND=1
    # keep the packages' services (dockerd, containerd, docker-registry on :5000) from being
    # started by the install: the tests start their own, privately
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    trap '[ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get update -qq
    apt-get install -y -qq -o Dpkg::Use-Pty=0 "${PACKAGES[@]}" >/dev/null
    for c in "${COMMANDS[@]}"; do
        command -v "$c" >/dev/null 2>&1 || { echo "tests/deps.sh: $c still missing after apt-get install" >&2; exit 1; }
    done
fi

# Python venv with oras-py and moto; remade whenever requirements.txt changes
VENV=$REPO/.venv
want=$(sha256sum tests/interop/requirements.txt | cut -c1-64)
have=$(cat "$VENV/.requirements-sha256" 2>/dev/null || true)
if [ "$have" != "$want" ] || ! "$VENV/bin/python" -c 'import oras.client' 2>/dev/null; then
    echo "tests/deps.sh: creating $VENV with tests/interop/requirements.txt"
    rm -rf "$VENV"
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
        [ "$(id -u)" = 0 ] || { echo "tests/deps.sh: python3 has no venv module; apt-get install python3-venv" >&2; exit 1; }
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/interop/requirements.txt
    "$VENV/bin/python" -c 'import oras.client' # fail here, not in the tests
    [ -x "$VENV/bin/moto_server" ] || { echo "tests/deps.sh: moto_server missing after pip install" >&2; exit 1; }
    echo "$want" >"$VENV/.requirements-sha256"
fi

# azurite, the Azure Blob Storage emulator tests/process/blobstore.rs runs `blob_store = az://…`
# against, from npm with the machine's Node.js. 3.35.0 is the last release that runs on Node 20
# (3.36 wants 21, 3.37 wants 22).
AZURITE_VERSION=3.35.0
AZURITE=$REPO/.cache/azurite
if [ "$(cat "$AZURITE/.version" 2>/dev/null)" != "$AZURITE_VERSION" ]; then
    command -v npm >/dev/null 2>&1 || {
        [ "$(id -u)" = 0 ] || { echo "tests/deps.sh: npm is missing; apt-get install npm" >&2; exit 1; }
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    }
    echo "tests/deps.sh: installing azurite $AZURITE_VERSION into $AZURITE"
    rm -rf "$AZURITE"
    mkdir -p "$AZURITE"
    npm install --prefix "$AZURITE" --no-audit --no-fund --silent "azurite@$AZURITE_VERSION"
    [ -x "$AZURITE/node_modules/.bin/azurite-blob" ] || { echo "tests/deps.sh: azurite-blob missing after npm install" >&2; exit 1; }
    echo "$AZURITE_VERSION" >"$AZURITE/.version"
fi
echo "tests/deps.sh: all test dependencies present (ORAS_PY=$VENV/bin/python, moto, azurite)"
