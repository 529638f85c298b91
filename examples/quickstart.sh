#!/usr/bin/env bash
# The main job, end to end on local files: a source checkpoint → `slmpkg build` makes, measures, signs and
# publishes the artifact of every target in the recipe → a device pulls the one made for it, verified.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-$(mktemp -d)}
export SLMPKG_HOME="$work/home"                 # the client's cache and rollback memory
mkdir -p "$work" && cd "$work"
python "$here/make_tiny_hf.py" tiny-llama        # a tiny random Llama, as a Hugging Face repo holds it
cp "$here/slmpkg.toml" .                         # name, version, source, targets, quality gate, registry
slmpkg keygen -o release
slmpkg build slmpkg.toml --plan                  # the jobs and the commands they stand for
slmpkg build slmpkg.toml                         # → slmpkg-build/, then the registry in ./registry
slmpkg build slmpkg.toml                         # nothing changed: nothing to do
slmpkg ls tiny-llama --registry registry
slmpkg pull tiny-llama:latest --target auto -o pulled --pub release.pub.pem --registry registry
slmpkg verify pulled --pub release.pub.pem --provenance   # signature and build provenance travelled with it
echo "done: $work (quality report: $work/slmpkg-build/reports/quality.html)"
