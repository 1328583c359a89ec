#!/usr/bin/env bash
# Install everything the test suite needs that a Debian 12 machine with the Rust toolchain
# (cargo, cargo-nextest) and python3 does not already have. Run as root. Idempotent:
# when every tool is already there it installs nothing (unless CI=true or DEPS_FORCE=1,
# which always run apt-get update + install).
#
#   Debian packages : the real registry clients and daemons tests/interop/run.sh drives,
#                     plus load tools for bench/
#   .venv/          : a Python venv with oras-py (tests/interop/requirements.txt);
#                     test.sh points ORAS_PY at .venv/bin/python
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" # dockerd, runc
cd "$(dirname "$0")/.."
REPO=$PWD

PACKAGES=(
    skopeo podman buildah umoci   # containers/image clients, OCI layout tools
    docker.io containerd          # dockerd + docker CLI (/usr/bin/docker), containerd + ctr
    docker-registry               # distribution 2.8, the reference registry
    curl jq ca-certificates       # raw HTTP checks
    iperf3 wrk                    # bench/
)
# one command per package above, to tell whether it is installed
COMMANDS=(skopeo podman buildah umoci dockerd /usr/bin/docker containerd ctr docker-registry curl jq iperf3 wrk)

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

# Python venv with oras-py
VENV=$REPO/.venv
want=$(sed -n 's/^oras==//p' tests/interop/requirements.txt)
have=$("$VENV/bin/python" -c 'import oras.version; print(oras.version.__version__)' 2>/dev/null || true)
if [ "$have" != "$want" ]; then
    echo "tests/deps.sh: creating $VENV with oras $want"
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
        [ "$(id -u)" = 0 ] || { echo "tests/deps.sh: python3 has no venv module; apt-get install python3-venv" >&2; exit 1; }
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/interop/requirements.txt
    "$VENV/bin/python" -c 'import oras.client' # fail here, not in the tests
fi
echo "tests/deps.sh: all test dependencies present (ORAS_PY=$VENV/bin/python)"
