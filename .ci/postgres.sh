#!/usr/bin/env bash
# Source this: a throw-away PostgreSQL server for the history store's tests.
# Installs the Debian package when no server binaries are found, inits a
# cluster in a temp dir, starts it on a free port (as the `postgres` user
# when run as root: the server refuses root) and exports
# MM27_TEST_POSTGRES=postgresql://... ; mm27_postgres_stop tears it down.
# No `set -e` here: sourcing would change the caller's shell; each step checks itself.

_mm27_pg_bin() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

if ! MM27_PG_BIN="$(_mm27_pg_bin)"; then
  echo "postgres.sh: installing postgresql (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null || return 1
  MM27_PG_BIN="$(_mm27_pg_bin)" || return 1
fi

MM27_PG_DIR="$(mktemp -d /tmp/mm27-pg.XXXXXX)"
MM27_PG_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
_mm27_as_pg() {
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown -R postgres "$MM27_PG_DIR"
    su postgres -s /bin/sh -c "$*"
  else
    sh -c "$*"
  fi
}
_mm27_as_pg "'$MM27_PG_BIN/initdb' -D '$MM27_PG_DIR/data' -U mm27 --auth=trust -E UTF8 >'$MM27_PG_DIR/initdb.log' 2>&1" \
  || { cat "$MM27_PG_DIR/initdb.log" >&2; return 1; }
# fsync off: a CI scratch server; a crash loses nothing we keep.
_mm27_as_pg "'$MM27_PG_BIN/pg_ctl' -D '$MM27_PG_DIR/data' -l '$MM27_PG_DIR/server.log' -w -t 60 \
  -o \"-p $MM27_PG_PORT -k $MM27_PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off\" start >/dev/null" \
  || { cat "$MM27_PG_DIR/server.log" >&2; return 1; }
export MM27_PG_DIR MM27_PG_BIN
export MM27_TEST_POSTGRES="postgresql://mm27@127.0.0.1:$MM27_PG_PORT/postgres"
echo "postgres.sh: PostgreSQL $("$MM27_PG_BIN/postgres" --version | awk '{print $3}') at $MM27_TEST_POSTGRES" >&2

mm27_postgres_stop() {
  _mm27_as_pg "'$MM27_PG_BIN/pg_ctl' -D '$MM27_PG_DIR/data' -m fast -w stop >/dev/null" || true
  rm -rf "$MM27_PG_DIR"
}
