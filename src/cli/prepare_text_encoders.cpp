#include "cli/prepare_text_encoders.h"

#include <sys/stat.h>

#include <algorithm>
#include <sstream>

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/fs.h"
#include "encoders/text_encoders.h"

namespace fluxtrain {
namespace {

// Names, sizes and modification times of the encoder and tokenizer files: cheap (T5-XXL is
// ~9 GB, hashing it on every run would cost more than encoding a small dataset) and changed by
// any replacement of the weights.
std::string files_identity(const std::string& dir) {
  // POSIX like core/fs.h (std::filesystem clashes with some LibTorch builds).
  std::vector<std::string> rows;
  for (const char* sub : {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"}) {
    const std::string d = path_join(dir, sub);
    if (!is_directory(d)) continue;
    for (const auto& name : list_directory(d)) {
      struct stat st;
      if (::stat(path_join(d, name).c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
      rows.push_back(std::string(sub) + "/" + name + ":" + std::to_string(st.st_size) + ":" +
                     std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec));
    }
  }
  std::sort(rows.begin(), rows.end());
  std::ostringstream ss;
  for (const auto& r : rows) ss << r << ";";
  return ss.str();
}

}  // namespace

PrepareTextEncoders load_prepare_text_encoders(const std::string& snapshot_dir, int64_t max_sequence_length,
                                               at::ScalarType dtype, c10::Device device) {
  TextEncoderSetup s;
  s.snapshot_dir = snapshot_dir;
  s.load_clip = s.load_t5 = true;
  s.dtype = dtype;
  s.device = device;
  s.max_sequence_length = max_sequence_length;
  PrepareTextEncoders p;
  try {
    p.encoders = std::make_shared<TextEncoders>(TextEncoders::load(s));
  } catch (...) {
    rethrow_with_context("--cache_text_embeddings: --pretrained_model_name_or_path");
  }
  p.hook.text_len = max_sequence_length;
  p.hook.text_dim = p.encoders->t5()->config().d_model;
  p.hook.pooled_dim = p.encoders->clip()->config().hidden_size;
  p.hook.identity = "clip+t5 files=" + files_identity(snapshot_dir) + " len=" + std::to_string(max_sequence_length) +
                    " dtype=" + c10::toString(dtype);
  std::shared_ptr<TextEncoders> enc = p.encoders;
  p.hook.encode = [enc](const std::vector<std::string>& captions) {
    at::NoGradGuard ng;
    const TextEncoding e = enc->encode(captions);
    return TextEmbeddings{e.prompt_embeds.to(at::kCPU).to(at::kFloat), e.pooled_prompt_embeds.to(at::kCPU).to(at::kFloat)};
  };
  return p;
}

}  // namespace fluxtrain
