# A throwaway PostgreSQL server for the test suite. Sourced by .ci/run (which
# defines apt_install); can also be sourced by hand:
#
#   source .ci/postgres.sh
#   start_test_postgres     # exports WEBHOOK_ROUTER_TEST_PG and friends
#   ...                     # cargo test, psql "$WEBHOOK_ROUTER_TEST_PG", ...
#   stop_test_postgres      # stops it and deletes its files; safe to repeat
#
# The server lives in a temporary folder, listens on 127.0.0.1 only (plus a
# Unix socket inside that folder), trusts every connection (no password: it
# only holds test data and is gone when CI ends) and keeps fsync and
# synchronous_commit on, since the tests check durability.
#
# Exported for the tests, so that one can restart the server under load:
#   WEBHOOK_ROUTER_TEST_PG       postgres://postgres@127.0.0.1:PORT/webhook_router_test
#   WEBHOOK_ROUTER_TEST_PG_CTL   path of pg_ctl
#   WEBHOOK_ROUTER_TEST_PG_DATA  the data folder (pg_ctl -D)
#   WEBHOOK_ROUTER_TEST_PG_USER  OS user owning the data folder, to run pg_ctl
#                                as (runuser -u USER --); empty when not root
#   WEBHOOK_ROUTER_TEST_PG_OPTS  the server options (pg_ctl -o) it started with
#   WEBHOOK_ROUTER_TEST_PG_LOG   the server log (pg_ctl -l)
# A restart, as run by a test:
#   [runuser -u "$WEBHOOK_ROUTER_TEST_PG_USER" --] "$WEBHOOK_ROUTER_TEST_PG_CTL" \
#       restart -D "$WEBHOOK_ROUTER_TEST_PG_DATA" -m immediate -w -t 60 \
#       -l "$WEBHOOK_ROUTER_TEST_PG_LOG" -o "$WEBHOOK_ROUTER_TEST_PG_OPTS"
# (Without -l the restarted server writes to pg_ctl's stdout and stderr and
# keeps them open: a caller reading pg_ctl's output would then wait forever.)
#
# When WEBHOOK_ROUTER_TEST_PG is already set (a developer's own database),
# start_test_postgres only says so and the other variables stay unset.

# State of the server started here; empty when none is.
_test_pg_dir=""  # temporary folder: data/, socket/, postgres.log
_test_pg_user="" # OS user running it; empty when not root
_test_pg_bin=""  # folder of its initdb, pg_ctl and postgres
_test_pg_owner="" # $BASHPID of the shell that started it
# psql to talk to the test database (set by start_test_postgres).
TEST_PG_PSQL=""

# Runs "$@" as $_test_pg_user (initdb refuses to run as root), or directly
# when that is empty, from the temporary folder (the current directory may not
# be readable by that user).
_test_pg_as_user() {
    (
        cd "${_test_pg_dir:-/}" || exit 1
        if [ -z "$_test_pg_user" ]; then
            "$@"
        elif command -v runuser >/dev/null 2>&1; then
            runuser -u "$_test_pg_user" -- "$@"
        elif command -v setpriv >/dev/null 2>&1; then
            setpriv --reuid="$_test_pg_user" --regid="$(id -g "$_test_pg_user")" \
                --init-groups -- "$@"
        else
            su -s /bin/sh -c 'exec "$@"' -- "$_test_pg_user" sh "$@"
        fi
    )
}

# Prints the folder holding initdb, pg_ctl and postgres (of one same
# installation), or fails. The one on PATH first, else Debian's
# /usr/lib/postgresql/VERSION/bin with the highest VERSION.
_test_pg_find_bin() {
    local candidates=() dir
    if command -v initdb >/dev/null 2>&1; then
        # Through symlinks (/usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb):
        # pg_ctl runs the postgres found next to its real path anyway.
        candidates+=("$(dirname "$(readlink -f "$(command -v initdb)")")")
    fi
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
        candidates+=("$dir")
    done
    for dir in "${candidates[@]}"; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

# Prints a TCP port that is free on 127.0.0.1 right now.
_test_pg_free_port() {
    if command -v python3 >/dev/null 2>&1 && python3 -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()' 2>/dev/null; then
        return 0
    fi
    # No python3: a random port nobody answers on (start_test_postgres
    # tries another one if the server still cannot bind it).
    local port
    while :; do
        port=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
}

# The URL with its password, if any, replaced by ***.
_test_pg_mask() {
    printf '%s\n' "$1" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#; s#(password=)[^ &]*#\1***#g'
}

start_test_postgres() {
    if [ -n "${WEBHOOK_ROUTER_TEST_PG:-}" ]; then
        echo "using the database in WEBHOOK_ROUTER_TEST_PG: $(_test_pg_mask "$WEBHOOK_ROUTER_TEST_PG")"
        TEST_PG_PSQL="$(command -v psql || true)"
        return 0
    fi
    if [ -n "$_test_pg_dir" ]; then
        echo "error: start_test_postgres: already started (in $_test_pg_dir)" >&2
        return 1
    fi

    local bin
    if ! bin="$(_test_pg_find_bin)"; then
        echo "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found; installing Debian's postgresql"
        apt_install postgresql || return 1
        if ! bin="$(_test_pg_find_bin)"; then
            echo "error: still no initdb, pg_ctl and postgres on PATH or in /usr/lib/postgresql/*/bin" >&2
            return 1
        fi
    fi
    _test_pg_bin="$bin"
    _test_pg_owner="$BASHPID"
    echo "PostgreSQL binaries: $bin ($("$bin/postgres" --version))"
    if [ -x "$bin/psql" ]; then
        TEST_PG_PSQL="$bin/psql"
    else
        TEST_PG_PSQL="$(command -v psql || true)"
    fi

    # Who runs the server: initdb refuses root.
    _test_pg_user=""
    if [ "$(id -u)" -eq 0 ]; then
        if id -u postgres >/dev/null 2>&1; then
            _test_pg_user=postgres # created by Debian's postgresql package
        else
            if ! id -u wr-pg >/dev/null 2>&1; then
                echo "creating the system user wr-pg to run PostgreSQL (it refuses root)"
                useradd --system --no-create-home --shell /usr/sbin/nologin wr-pg || return 1
            fi
            _test_pg_user=wr-pg
        fi
    fi

    # The temporary folder, owned by that user. Under $TMPDIR unless that
    # path is long (the Unix socket path must stay under 108 bytes), has
    # characters needing quotes, or is closed to that user; then under /tmp.
    local base="${TMPDIR:-/tmp}"
    if [ "${#base}" -gt 60 ] || [[ ! "$base" =~ ^[A-Za-z0-9/._-]+$ ]]; then
        base=/tmp
    fi
    _test_pg_dir="$(mktemp -d "$base/webhook-router-pg.XXXXXX")" || { _test_pg_dir=""; return 1; }
    if [ -n "$_test_pg_user" ]; then
        chown "$_test_pg_user:" "$_test_pg_dir" || { stop_test_postgres; return 1; }
        if ! _test_pg_as_user test -w "$_test_pg_dir" 2>/dev/null && [ "$base" != /tmp ]; then
            rm -rf "$_test_pg_dir"
            _test_pg_dir="$(mktemp -d /tmp/webhook-router-pg.XXXXXX)" || { _test_pg_dir=""; return 1; }
            chown "$_test_pg_user:" "$_test_pg_dir" || { stop_test_postgres; return 1; }
        fi
    fi
    local data="$_test_pg_dir/data" sockets="$_test_pg_dir/socket" log="$_test_pg_dir/postgres.log"
    _test_pg_as_user mkdir "$sockets" || { stop_test_postgres; return 1; }

    # --no-sync only makes initdb itself skip fsync; the server below runs
    # with the defaults, fsync=on and synchronous_commit=on. --locale=C: a
    # LANG naming a locale this machine lacks would make initdb fail.
    if ! _test_pg_as_user "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 \
        --locale=C --no-sync >"$_test_pg_dir/initdb.log" 2>&1; then
        echo "error: initdb failed:" >&2
        cat "$_test_pg_dir/initdb.log" >&2
        stop_test_postgres
        return 1
    fi

    # Start on a free port; if another process takes it first, try another.
    local port opts attempt started=""
    for attempt in 1 2 3 4 5; do
        port="$(_test_pg_free_port)" || { stop_test_postgres; return 1; }
        opts="-c listen_addresses=127.0.0.1 -p $port -k $sockets -c max_connections=300 -c shared_buffers=128MB"
        rm -f "$log"
        if _test_pg_as_user "$bin/pg_ctl" -D "$data" -w -t 60 -o "$opts" -l "$log" start >/dev/null; then
            started=1
            break
        fi
        if ! grep -q 'could not bind\|Address already in use' "$log" 2>/dev/null; then
            break
        fi
        echo "port $port was taken meanwhile (attempt $attempt); trying another"
    done
    if [ -z "$started" ]; then
        echo "error: the PostgreSQL server did not start; its log ($log):" >&2
        cat "$log" >&2 || true
        stop_test_postgres
        return 1
    fi
    echo "PostgreSQL server started on 127.0.0.1:$port (data in $data, log in $log)"

    if ! "$TEST_PG_PSQL" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -v ON_ERROR_STOP=1 -c 'CREATE DATABASE webhook_router_test'; then
        echo "error: could not create the database webhook_router_test; the server log:" >&2
        cat "$log" >&2 || true
        stop_test_postgres
        return 1
    fi

    export WEBHOOK_ROUTER_TEST_PG="postgres://postgres@127.0.0.1:$port/webhook_router_test"
    export WEBHOOK_ROUTER_TEST_PG_CTL="$bin/pg_ctl"
    export WEBHOOK_ROUTER_TEST_PG_DATA="$data"
    export WEBHOOK_ROUTER_TEST_PG_USER="$_test_pg_user"
    export WEBHOOK_ROUTER_TEST_PG_OPTS="$opts"
    export WEBHOOK_ROUTER_TEST_PG_LOG="$log"
    echo "WEBHOOK_ROUTER_TEST_PG=$WEBHOOK_ROUTER_TEST_PG"
}

# Stops the server started by start_test_postgres and deletes its folder;
# does nothing otherwise (a developer's database is left alone), so it is
# safe to call twice or without a start. Also does nothing in a subshell: a
# child forked for `cmd &` that is killed before it has exec'd cmd runs the
# parent's EXIT trap (bash 5.2), and must not stop the server under the parent.
stop_test_postgres() {
    if [ -z "$_test_pg_dir" ] || [ "$BASHPID" != "$_test_pg_owner" ]; then
        return 0
    fi
    local data="$_test_pg_dir/data"
    if [ -f "$data/postmaster.pid" ]; then
        local pg_ctl="$_test_pg_bin/pg_ctl"
        if ! _test_pg_as_user "$pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null; then
            echo "warning: fast stop of the test PostgreSQL failed; stopping it immediately" >&2
            _test_pg_as_user "$pg_ctl" -D "$data" -m immediate -w -t 60 stop >/dev/null ||
                echo "warning: could not stop the test PostgreSQL (data in $data)" >&2
        fi
    fi
    rm -rf "$_test_pg_dir"
    echo "test PostgreSQL stopped and $_test_pg_dir removed"
    _test_pg_dir=""
    _test_pg_user=""
    _test_pg_bin=""
    _test_pg_owner=""
    unset WEBHOOK_ROUTER_TEST_PG WEBHOOK_ROUTER_TEST_PG_CTL WEBHOOK_ROUTER_TEST_PG_DATA \
        WEBHOOK_ROUTER_TEST_PG_USER WEBHOOK_ROUTER_TEST_PG_OPTS WEBHOOK_ROUTER_TEST_PG_LOG
}
