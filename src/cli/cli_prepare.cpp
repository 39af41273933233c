// fluxtrain prepare: EasyControl's jsonl + images -> HDF5 dataset (src/data/prepare.h,
// docs/dataset.md). Flag names follow EasyControl's train.py where it has them.
#include <iostream>

#include <boost/program_options.hpp>

#include "cli/cli_common.h"
#include "cli/prepare_text_encoders.h"
#include "cli/commands.h"
#include "core/error.h"
#include "data/prepare.h"

namespace po = boost::program_options;

namespace fluxtrain {

int cmd_prepare(int argc, char** argv) {
  PrepareOptions o;
  std::string latent_dtype = "f32", vae_dtype = "f32", device = "cpu", embed_dtype = "bf16", te_dtype = "f32";
  int64_t max_sequence_length = 512;
  int64_t seed = 0, tile_px = o.tile.tile_px, overlap_px = o.tile.overlap_px;
  bool json = false, cache_text = false;
  po::options_description desc("prepare options");
  desc.add_options()
      ("pretrained_model_name_or_path", po::value(&o.model), "FLUX snapshot (its ae.safetensors or vae/ encodes the images)")
      ("vae_layout", po::value(&o.vae_layout)->default_value(o.vae_layout), "auto, bfl or diffusers")
      ("train_data_dir", po::value(&o.jsonl)->required(), "EasyControl jsonl file (one sample per line)")
      ("output", po::value(&o.output)->required(), "HDF5 dataset to write (atomically)")
      ("target_column", po::value(&o.target_column)->default_value(o.target_column), "key of the target image")
      ("caption_column", po::value(&o.caption_column)->default_value(o.caption_column), "key of the caption")
      ("subject_column", po::value(&o.subject_column)->default_value(o.subject_column),
       "subject condition key(s), comma-separated, or None")
      ("spatial_column", po::value(&o.spatial_column)->default_value(o.spatial_column),
       "spatial condition key(s), comma-separated, or None")
      ("lora_num", po::value(&o.lora_num)->default_value(-1), "expected number of condition columns (-1: no check)")
      ("noise_size", po::value(&o.noise_size)->default_value(o.noise_size),
       "target buckets: area <= noise_size^2, sides multiples of 16")
      ("cond_size", po::value(&o.cond_size)->default_value(o.cond_size), "condition images: cond_size x cond_size")
      ("bucket_max_aspect", po::value(&o.bucket_max_aspect)->default_value(o.bucket_max_aspect),
       "largest bucket aspect ratio (either way)")
      ("cache_latents", po::bool_switch(&o.cache_latents), "encode images with the VAE now (else images are stored "
                                                            "and the trainer encodes them)")
      ("augment_variants", po::value(&o.augment_variants)->default_value(o.augment_variants),
       "--cache_latents: augmented variants cached per subject condition")
      ("cache_text_embeddings", po::bool_switch(&cache_text),
       "cache T5 states and CLIP pooled vectors per caption (and of the dropped caption \" \") with the snapshot's "
       "text encoders; without it captions are stored and the trainer encodes them")
      ("max_sequence_length", po::value(&max_sequence_length)->default_value(max_sequence_length),
       "--cache_text_embeddings: T5 tokens per caption (train with the same value)")
      ("embed_dtype", po::value(&embed_dtype)->default_value(embed_dtype), "stored embeddings: bf16, f16, f32")
      ("text_encoder_dtype", po::value(&te_dtype)->default_value(te_dtype),
       "--cache_text_embeddings: encoder compute dtype: f32, bf16")
      ("caption_dropout", po::value(&o.caption_dropout)->default_value(o.caption_dropout),
       "probability that a caption becomes \" \" (drawn per seed, epoch, sample in training)")
      ("on_bad_sample", po::value(&o.on_bad_sample)->default_value(o.on_bad_sample),
       "skip: report and leave out bad lines; fail: write nothing")
      ("seed", po::value(&seed)->default_value(0), "seed of the cached augmentation variants")
      ("latent_dtype", po::value(&latent_dtype)->default_value(latent_dtype), "stored latents: f32, bf16, f16")
      ("vae_dtype", po::value(&vae_dtype)->default_value(vae_dtype), "VAE compute dtype: f32, bf16")
      ("device", po::value(&device)->default_value(device), "VAE device: cpu or cuda[:N]")
      ("tile_size", po::value(&tile_px)->default_value(tile_px), "VAE tile side in pixels for larger images (0 = off)")
      ("tile_overlap", po::value(&overlap_px)->default_value(overlap_px), "VAE tile overlap in pixels")
      ("json", po::bool_switch(&json), "also print the summary as one JSON line (benchmarks)");
  po::variables_map vm;
  if (!parse_command_line("prepare", desc, argc, argv, vm)) return 0;
  check_output_file("--output", o.output, {{"--train_data_dir", o.jsonl}});
  check_input(seed >= 0, "--seed must be >= 0");
  o.seed = static_cast<uint64_t>(seed);
  o.latent_dtype = parse_dtype(latent_dtype, "--latent_dtype");
  check_input(o.latent_dtype != at::kDouble, "--latent_dtype: float64 is not a dataset dtype");
  o.vae_dtype = parse_dtype(vae_dtype, "--vae_dtype");
  o.device = parse_device(device, "--device").str();
  check_input(tile_px == 0 || (tile_px % 16 == 0 && overlap_px % 8 == 0 && overlap_px >= 0 && overlap_px < tile_px),
              "--tile_size must be a multiple of 16 and --tile_overlap a multiple of 8 below it");
  o.tile = {tile_px, tile_px > 0 ? overlap_px : 0};
  o.embed_dtype = parse_dtype(embed_dtype, "--embed_dtype");
  check_input(o.embed_dtype != at::kDouble, "--embed_dtype: float64 is not a dataset dtype");
  PrepareTextEncoders text;
  if (cache_text) {
    check_input(!o.model.empty(), "--cache_text_embeddings needs --pretrained_model_name_or_path (the text encoders)");
    check_input(max_sequence_length >= 1 && max_sequence_length <= 512,
                "--max_sequence_length must be between 1 and 512 (T5's trained length)");
    text = load_prepare_text_encoders(o.model, max_sequence_length, parse_dtype(te_dtype, "--text_encoder_dtype"),
                                      parse_device(device, "--device"));
    o.text = &text.hook;
  }
  const PrepareSummary s = prepare_dataset(o);
  std::cerr << format_summary(s, o.output);
  if (json) std::cout << summary_json(s, o) << std::endl;
  std::cout << o.output << "\n";
  return 0;
}

}  // namespace fluxtrain
