#!/usr/bin/env bash
# The main job on the embedded tiny default, on the CPU, with no downloads: set up + build, write
# a tiny random FLUX.1 snapshot (transformer, autoencoder, CLIP and T5 with their tokenizers),
# draw a few pictures with captions (launch/make_demo_images.py: EasyControl's jsonl layout),
# turn them into a dataset with `fluxtrain prepare` (aspect buckets, cached latents), then train
# an EasyControl subject LoRA plus a CLIP LoRA from the captions with configs/tiny-cpu.ini.
# Ends with the path of the LoRA it wrote. Extra arguments go to `fluxtrain train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
B=${FLUXTRAIN_BUILD:-build}/fluxtrain
VENV=${FLUXTRAIN_VENV:-$HOME/.cache/fluxtrain/venv}
RUN=${FLUXTRAIN_RUN_DIR:-runs/quickstart}
mkdir -p "$RUN"
[ -f "$RUN/model/flux1-dev.safetensors" ] || "$B" init-model --size tiny --output_dir "$RUN/model" > /dev/null
[ -f "$RUN/images/data.jsonl" ] || "$VENV/bin/python" launch/make_demo_images.py "$RUN/images" > /dev/null
# Re-running on unchanged pictures is a no-op (content hashes). Without --cache_latents the
# pictures are stored and `train` encodes them itself (docs/dataset.md); --cache_text_embeddings
# would cache the frozen encoders' output, but this run trains CLIP's LoRA, so it encodes captions.
"$B" prepare --pretrained_model_name_or_path "$RUN/model" --train_data_dir "$RUN/images/data.jsonl" \
  --output "$RUN/data.h5" --noise_size 128 --cond_size 64 --subject_column subject --lora_num 1 --cache_latents
"$B" train --config configs/tiny-cpu.ini --pretrained_model_name_or_path "$RUN/model" \
  --train_data "$RUN/data.h5" --output_dir "$RUN/output" --train_text_encoder_one_only "$@"
echo "LoRA: $RUN/output/lora.safetensors (text encoder: $RUN/output/text_encoder_lora.safetensors)"
