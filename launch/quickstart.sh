#!/usr/bin/env bash
# The main job on the embedded tiny default, on the CPU, with no downloads: set up + build, write
# a tiny random FLUX.1 snapshot (transformer, autoencoder, CLIP and T5 with their tokenizers),
# draw a few pictures with captions (launch/make_demo_images.py: EasyControl's jsonl layout),
# turn them into a dataset with `fluxtrain prepare` (aspect buckets, cached latents), then train
# an EasyControl subject LoRA plus a CLIP LoRA from the captions with configs/tiny-cpu.ini.
# Draws validation pictures while training and a last picture with `fluxtrain sample`.
# Ends with the paths of the LoRA and the pictures it wrote. Extra arguments go to `fluxtrain train`.
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
# Validation pictures every 250 steps (output/validation/, and TensorBoard under output/logs/).
"$B" train --config configs/tiny-cpu.ini --pretrained_model_name_or_path "$RUN/model" \
  --train_data "$RUN/data.h5" --output_dir "$RUN/output" --train_text_encoder_one_only \
  --validation_prompt "a red circle on a pale background" --subject_test_images "$RUN/images/subject_0.png" \
  --validation_steps 250 --num_validation_images 2 --validation_inference_steps 8 "$@"
# A picture from the trained LoRAs (transformer and CLIP), as any user would draw one.
"$B" sample --pretrained_model_name_or_path "$RUN/model" --lora "$RUN/output/lora.safetensors" \
  --text_encoder_lora "$RUN/output/text_encoder_lora.safetensors" \
  --prompt "a blue square on a pale background" --subject_image "$RUN/images/subject_1.png" --cond_size 64 \
  --height 128 --width 128 --num_inference_steps 8 --seed 3 --output "$RUN/picture.png"
echo "LoRA: $RUN/output/lora.safetensors (text encoder: $RUN/output/text_encoder_lora.safetensors)"
echo "pictures: $RUN/picture.png and $RUN/output/validation/"
