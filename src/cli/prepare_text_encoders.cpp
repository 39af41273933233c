#include "cli/prepare_text_encoders.h"

#include <algorithm>
#include <filesystem>
#include <sstream>

#include <ATen/ATen.h>

#include "core/error.h"
#include "encoders/text_encoders.h"

namespace fluxtrain {
namespace {

// Names, sizes and modification times of the encoder and tokenizer files: cheap (T5-XXL is
// ~9 GB, hashing it on every run would cost more than encoding a small dataset) and changed by
// any replacement of the weights.
std::string files_identity(const std::string& dir) {
  namespace fs = std::filesystem;
  std::vector<std::string> rows;
  for (const char* sub : {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"}) {
    const fs::path p = fs::path(dir) / sub;
    std::error_code ec;
    if (!fs::is_directory(p, ec)) continue;
    for (const auto& e : fs::directory_iterator(p, ec)) {
      if (!e.is_regular_file(ec)) continue;
      const auto t = fs::last_write_time(e.path(), ec).time_since_epoch().count();
      rows.push_back(std::string(sub) + "/" + e.path().filename().string() + ":" +
                     std::to_string(e.file_size(ec)) + ":" + std::to_string(t));
    }
  }
  std::sort(rows.begin(), rows.end());
  std::ostringstream ss;
  for (const auto& r : rows) ss << r << ";";
  return std::to_string(std::hash<std::string>{}(ss.str()));
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
