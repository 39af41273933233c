#!/bin/bash
# CI: configure (once) and build the libFuzzer targets with clang in build-fuzz, then run each
# for 8 s from the seed corpus (7 targets, about 60 s) (tests/fuzz/run_ci.sh). Needs clang and libclang-rt (launch/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${FLUXTRAIN_FUZZ_BUILD:-build-fuzz}
if [[ ! -f $build/build.ninja ]]; then
  launcher=(); command -v ccache > /dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  CC=clang CXX=clang++ cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFLUXTRAIN_FUZZ=ON \
    -DFLUXTRAIN_TESTS=OFF -DFLUXTRAIN_PCH=OFF -DFLUXTRAIN_PYTHON="${FLUXTRAIN_VENV:-$HOME/.cache/fluxtrain/venv}/bin/python" \
    "${launcher[@]}" > /dev/null
fi
targets=(fuzz_safetensors fuzz_config fuzz_checkpoint fuzz_dataset fuzz_jsonl fuzz_tokenizers)
# fuzz_image exists only where libvips was found.
ninja -C "$build" -t targets all | grep -q '^fuzz_image:' && targets+=(fuzz_image)
ninja -C "$build" "${targets[@]}"
exec tests/fuzz/run_ci.sh "$build" "${FUZZ_SECONDS:-8}"
