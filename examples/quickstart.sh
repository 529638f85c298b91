#!/usr/bin/env bash
# End to end on the embedded local registry: make a tiny model, quantize it for two hardware targets,
# sign, push, and pull the artifact made for this machine (--target auto), verified.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-$(mktemp -d)}
export SLMPKG_HOME="$work/home"          # the registry lives in $SLMPKG_HOME/registry
mkdir -p "$work" && cd "$work"
python "$here/make_tiny_llama.py" tiny-f16.gguf
mkdir -p avx2 arm
slmpkg quantize tiny-f16.gguf -o avx2/tiny.gguf --quant Q4_K_M -q
slmpkg quantize tiny-f16.gguf -o arm/tiny.gguf --quant Q4_0 -q
slmpkg keygen -o release
slmpkg sign avx2 --key release.pem                      # OpenSSF model-signing bundle: avx2/model.sig
slmpkg push tiny:1.0 avx2 --target cpu-x86_64-avx2 --key release.pem --tag latest
slmpkg push tiny:1.0 arm --target cpu-arm64 --key release.pem
slmpkg ls tiny
slmpkg pull tiny:latest --target auto -o pulled --pub release.pub.pem
slmpkg verify pulled --pub release.pub.pem              # the signature travelled with the artifact
slmpkg inspect pulled/tiny.gguf | head -6
echo "done: $work"
