// fluxtrain: one binary, subcommands. Errors print as one line; exit 2 = bad input, 1 = internal.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "cli/commands.h"
#include "core/error.h"
#include "core/limits.h"

namespace {

struct Command {
  const char* name;
  int (*fn)(int, char**);
  const char* help;
};

const Command kCommands[] = {
    {"init-model", fluxtrain::cmd_init_model, "write a randomly initialised transformer (BFL + diffusers layouts)"},
    {"forward", fluxtrain::cmd_forward, "run the transformer on an inputs .safetensors file, write the output"},
    {"bench", fluxtrain::cmd_bench, "time one LoRA training step (JSON lines)"},
    {"train", fluxtrain::cmd_train, "train a LoRA (EasyControl flags, INI presets in configs/)"},
    {"synth-data", fluxtrain::cmd_synth_data, "write a small learnable synthetic HDF5 dataset"},
    {"estimate", fluxtrain::cmd_estimate, "predict peak GPU memory of a training configuration (no model files)"},
    {"doctor", fluxtrain::cmd_doctor, "check the GPUs and recommend the preset that fits"},
    {"prepare", fluxtrain::cmd_prepare, "images + EasyControl jsonl -> HDF5 training dataset (buckets, cached latents)"},
    {"vae", fluxtrain::cmd_vae, "FLUX autoencoder: encode/decode a .safetensors file, or --bench"},
    {"image", fluxtrain::cmd_image, "decode an image file as prepare does (pixels to .safetensors / PNG)"},
    {"encode", fluxtrain::cmd_encode, "tokenise and encode prompts with CLIP and T5 (docs/encoders.md)"},
    {"convert-lora", fluxtrain::cmd_convert_lora, "rewrite a LoRA file as kohya (ComfyUI), diffusers or easycontrol"},
    {"sample", fluxtrain::cmd_sample, "images from prompts with an optional LoRA and conditions (docs/sampling.md)"},
};

void usage(std::FILE* out) {
  std::fprintf(out, "usage: fluxtrain <command> [options]   (fluxtrain <command> --help for its options)\n\ncommands:\n");
  for (const auto& c : kCommands) std::fprintf(out, "  %-12s %s\n", c.name, c.help);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  for (const auto& c : kCommands) {
    if (name != c.name) continue;
    try {
      return c.fn(argc - 1, argv + 1);
    } catch (const fluxtrain::Error& e) {
      // Printable: messages may echo bytes read from files (core/limits.h).
      std::fprintf(stderr, "fluxtrain %s: error: %s\n", c.name, fluxtrain::limits::printable(e.what(), 2000).c_str());
      return e.exit_code();
    } catch (const std::exception& e) {
      // Internal failures (LibTorch errors carry multi-line backtraces: keep the first line).
      std::string msg = e.what();
      if (!std::getenv("FLUXTRAIN_DEBUG")) msg = msg.substr(0, msg.find('\n'));
      std::fprintf(stderr, "fluxtrain %s: internal error: %s\n", c.name, msg.c_str());
      return 1;
    }
  }
  std::fprintf(stderr, "fluxtrain: unknown command '%s'\n", name.c_str());
  usage(stderr);
  return 2;
}
