#!/usr/bin/env bash
# A private PostgreSQL server for the tests (Debian's postgresql package), on 127.0.0.1.
#
#   tests/postgres.sh start DIR   initialise a cluster in DIR (the first time), start it, print
#                                 its URL (the same port every time)
#   tests/postgres.sh stop DIR    stop it (DIR can then be removed, or started again)
#
# As root, DIR is handed to the `postgres` user, who must be able to reach it: not inside a
# directory of mode 700 such as mktemp -d makes (use a mktemp -d of its own).
#
# As root (CI), the server runs as the package's `postgres` user: PostgreSQL refuses root.
# fsync is off: the tests check Outpost, not the disk. Commits still reach the OS before they
# return, so a server stopped with -m immediate (a crash) keeps them.
set -euo pipefail
cmd=${1:?usage: tests/postgres.sh start|stop DIR}
dir=${2:?usage: tests/postgres.sh start|stop DIR}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] || { echo "tests/postgres.sh: PostgreSQL is not installed (apt-get install postgresql; tests/deps.sh does it)" >&2; exit 1; }
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case $cmd in
start)
    if [ -f "$dir/port" ]; then
        # Started before (and stopped): the same cluster on the same port.
        port=$(cat "$dir/port")
    else
        mkdir -p "$dir"
        [ "$(id -u)" = 0 ] && chown postgres: "$dir"
        as_pg "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1 ||
            { cat "$dir/initdb.log" >&2; exit 1; }
        port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        echo "$port" >"$dir/port"
    fi
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -s \
        -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off -c max_connections=400" start ||
        { cat "$dir/server.log" >&2; exit 1; }
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate -w -s stop || true
    ;;
*)
    echo "usage: tests/postgres.sh start|stop DIR" >&2
    exit 2
    ;;
esac
