#!/usr/bin/env bash
# Installs everything parkway needs on Debian 12, idempotently and quickly when done:
#   1. Debian packages (apt-get, only those missing),
#   2. the Python test venv (.venv, pinned tests/requirements.txt),
#   3. the default model (tools/fetch-model.sh).
# Usage: tools/setup-deps.sh [--no-model] [--no-venv]
# Env: PARKWAY_MODEL_DIR (default ~/.cache/parkway/models), PARKWAY_VENV (default .venv).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
want_model=1
want_venv=1
for a in "$@"; do
    case "$a" in
    --no-model) want_model=0 ;;
    --no-venv) want_venv=0 ;;
    *) echo "setup-deps: unknown option $a" >&2; exit 2 ;;
    esac
done

# Keep in step with docs/DEPENDENCIES.md.
packages=(
    build-essential cmake pkg-config clang
    libevent-dev node-llhttp libprotobuf-c-dev protobuf-c-compiler libhiredis-dev
    redis-server libssl-dev libyaml-dev libjansson-dev libcmocka-dev
    python3 python3-venv python3-pip
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-deps: installing ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts a system redis-server on 6379; parkway runs its own, so stop that one.
    if printf '%s\n' "${missing[@]}" | grep -qx redis-server; then
        $sudo systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
fi

if [ "$want_venv" = 1 ]; then
    venv=${PARKWAY_VENV:-$here/.venv}
    stamp=$venv/.requirements.sha256
    want=$(sha256sum "$here/tests/requirements.txt" | cut -d' ' -f1)
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "setup-deps: creating venv $venv" >&2
        # Debian's python3, not whatever python3 a user's PATH puts first.
        py=/usr/bin/python3
        [ -x "$py" ] || py=$(command -v python3)
        "$py" -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/tests/requirements.txt"
        echo "$want" >"$stamp"
    fi
fi

if [ "$want_model" = 1 ]; then
    "$here/tools/fetch-model.sh"
fi
