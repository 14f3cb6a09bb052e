# Set-up shared by scripts/test and scripts/demo; source it, do not run it.
# Idempotent: installs the PostgreSQL 15 server if it is missing (Debian), creates
# .venv and installs the project into it (again when pyproject.toml changed).
# Leaves the shell in the repository root.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

_say() { printf 'setup: %s\n' "$*" >&2; }

_as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo env DEBIAN_FRONTEND=noninteractive "$@"
  else
    _say "need root (or sudo) to run: $*"
    return 1
  fi
}

_have_postgres() {
  local bindir
  for bindir in "${PICOPYN_PG_BINDIR:-}" "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/*/bin; do
    if [ -n "$bindir" ] && [ -x "$bindir/postgres" ] && [ -x "$bindir/initdb" ]; then
      if [ -x "$bindir/psql" ] || command -v psql >/dev/null 2>&1; then
        return 0
      fi
    fi
  done
  return 1
}

_online_clusters() {
  if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters --no-header 2>/dev/null | awk '$4 == "online" { print $1 " " $2 }'
  fi
}

_install_postgres() {
  local before cluster
  _say "installing PostgreSQL (apt-get install -y postgresql)"
  before="$(_online_clusters)"
  export DEBIAN_FRONTEND=noninteractive
  _as_root apt-get update -qq
  _as_root apt-get install -y -qq postgresql >/dev/null
  # The package may start a Debian cluster service; the tests run their own servers.
  while read -r cluster; do
    if [ -n "$cluster" ] && ! grep -qxF "$cluster" <<<"$before"; then
      _say "stopping the cluster the package started ($cluster)"
      # shellcheck disable=SC2086  # "<version> <name>" are two arguments
      _as_root pg_ctlcluster $cluster stop || true
    fi
  done <<<"$(_online_clusters)"
}

_make_venv() {
  if ! command -v python3 >/dev/null 2>&1; then
    _say "installing python3"
    _as_root apt-get update -qq
    _as_root apt-get install -y -qq python3 python3-venv >/dev/null
  fi
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    _say "picopyn_actors needs Python 3.11 or newer; python3 is $(python3 --version 2>&1)"
    return 1
  fi
  _say "creating .venv"
  if ! python3 -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    _say "installing python3-venv"
    _as_root apt-get update -qq
    _as_root apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv .venv
  fi
}

_install_project() {
  local stamp=.venv/.picopyn-actors-setup want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && .venv/bin/python -c 'import importlib.metadata as m; m.version("picopyn_actors")' 2>/dev/null; then
    return 0
  fi
  _say "installing picopyn_actors and its dev tools into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  printf '%s\n' "$want" >"$stamp"
}

_have_postgres || _install_postgres
[ -x .venv/bin/python ] || _make_venv
_install_project
