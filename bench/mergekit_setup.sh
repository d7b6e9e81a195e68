#!/usr/bin/env bash
# Install mergekit into its own venv (bench/.venv-mergekit) for the merge benchmark.
# torch is installed FIRST from the local CPU wheel and then pinned by a constraint so that
# mergekit's dependency resolution never replaces it with a CUDA build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-mergekit"
py="${PYTHON:-python3.11}"
torch_version="${TORCH_VERSION:-2.13.0}"

if [ -x "$venv/bin/mergekit-yaml" ]; then
    echo "mergekit already installed in $venv"
    exit 0
fi
"$py" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install "torch==$torch_version"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"
"$venv/bin/pip" install -c "$constraints" mergekit
"$venv/bin/mergekit-yaml" --help >/dev/null
echo "mergekit installed in $venv"
