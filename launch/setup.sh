#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and builds fluxtrain (CPU build) into ./build.
#  - Debian packages: compilers' libraries fluxtrain links (MPI, HDF5, Boost.PO, nlohmann-json, GTest)
#  - a Python virtual environment with PyPI's torch 2.11.0 (its LibTorch is what we link) and the
#    reference implementations the tests compare against (diffusers, transformers, safetensors)
# Idempotent: each step is skipped when already done. Env: FLUXTRAIN_VENV (default
# ~/.cache/fluxtrain/venv), FLUXTRAIN_BUILD (default ./build), JOBS (default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLUXTRAIN_VENV:-$HOME/.cache/fluxtrain/venv}
BUILD=${FLUXTRAIN_BUILD:-build}
JOBS=${JOBS:-$(nproc)}

# Tokenizers: SentencePiece (T5), PCRE2 (CLIP's pre-tokenisation). Images: libvips.
# TensorBoard event files: protobuf. ccache keeps rebuilds quick on small machines.
# Fuzzing (tests/fuzz): clang + libFuzzer. The local Slurm test (tests/py/test_slurm_local.py):
# slurmctld, slurmd, slurm-client, munge.
pkgs="build-essential cmake ninja-build python3-venv libopenmpi-dev openmpi-bin libhdf5-dev
      libboost-program-options-dev libboost-dev nlohmann-json3-dev libgtest-dev
      libsentencepiece-dev libpcre2-dev libicu-dev libvips-dev libprotobuf-dev protobuf-compiler ccache
      clang libclang-rt-14-dev slurmctld slurmd slurm-client munge"
missing=""
for p in $pkgs; do dpkg -s "$p" > /dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing > /dev/null
fi

if ! "$VENV/bin/python" -c "import torch, diffusers, safetensors, peft, PIL, tensorboard, sentencepiece" > /dev/null 2>&1; then
  echo "setup: creating Python environment in $VENV (torch 2.11.0 + reference packages)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.11.0 numpy diffusers==0.42.1 transformers==5.23.0 safetensors==0.8.0 \
    peft pillow tensorboard sentencepiece protobuf
fi

# CPU build: links libtorch_cpu from the wheel; CUDA is not involved even though the wheel has it
# (cmake/FluxtrainTorch.cmake). GPU build: see README, "GPU build".
if [ ! -f "$BUILD/build.ninja" ]; then
  launcher=""
  command -v ccache > /dev/null && launcher="-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFLUXTRAIN_PYTHON="$VENV/bin/python" $launcher > /dev/null
fi
ninja -C "$BUILD" -j"$JOBS"
