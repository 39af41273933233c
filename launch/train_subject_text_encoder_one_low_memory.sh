#!/usr/bin/env bash
# The seed guide's script name, as a thin wrapper over configs/text-encoder-one-low-memory.ini.
# Usage: launch/train_subject_text_encoder_one_low_memory.sh --pretrained_model_name_or_path DIR --train_data data.h5 [--output_dir DIR] [more flags]
# Any flag given here wins over the preset. FLUXTRAIN_BIN picks the binary (default: build/fluxtrain).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "${FLUXTRAIN_BIN:-$root/build/fluxtrain}" train --config "$root/configs/text-encoder-one-low-memory.ini" "$@"
