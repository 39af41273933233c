#!/usr/bin/env bash
# The main job on the embedded tiny default, on the CPU, with no downloads:
# set up + build, write a tiny random FLUX transformer (BFL + diffusers layouts), a small
# learnable synthetic HDF5 dataset, then train an EasyControl LoRA with configs/tiny-cpu.ini.
# Ends with the path of the LoRA it wrote. Extra arguments go to `fluxtrain train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
B=${FLUXTRAIN_BUILD:-build}/fluxtrain
RUN=${FLUXTRAIN_RUN_DIR:-runs/quickstart}
mkdir -p "$RUN"
[ -f "$RUN/model/flux1-dev.safetensors" ] || "$B" init-model --size tiny --output_dir "$RUN/model" > /dev/null
[ -f "$RUN/data.h5" ] || "$B" synth-data --size tiny --output "$RUN/data.h5" > /dev/null
"$B" train --config configs/tiny-cpu.ini --pretrained_model_name_or_path "$RUN/model" \
  --train_data "$RUN/data.h5" --output_dir "$RUN/output" "$@"
echo "LoRA: $RUN/output/lora.safetensors"
