#include "encoders/text_encoder_lora.h"

#include <ATen/ATen.h>

#include <cmath>

#include "core/error.h"
#include "core/rng.h"

namespace fluxtrain {

TextEncoderLora TextEncoderLora::create(const std::vector<TextLoraTarget>& targets, int64_t rank, double alpha,
                                        uint64_t seed) {
  check_input(rank > 0, "text encoder LoRA: --text_encoder_rank must be positive");
  check_input(std::isfinite(alpha) && alpha > 0, "text encoder LoRA: --text_encoder_alpha must be positive");
  TextEncoderLora l;
  l.rank_ = rank;
  l.alpha_ = alpha;
  at::Generator gen = cpu_generator(derive_seed(seed, RngPurpose::LoraInit, 0x7E, 0));
  for (const auto& t : targets) {
    TextLoraAdapter a;
    a.target = t;
    // peft's default: kaiming_uniform_(a=sqrt(5)) on A, i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0.
    const double bound = 1.0 / std::sqrt(static_cast<double>(t.in_features));
    a.A = at::empty({rank, t.in_features}, at::kFloat).uniform_(-bound, bound, gen).set_requires_grad(true);
    a.B = at::zeros({t.out_features, rank}, at::kFloat).set_requires_grad(true);
    l.adapters_.push_back(std::move(a));
  }
  return l;
}

const TextLoraAdapter* TextEncoderLora::find(int layer, const std::string& proj) const {
  for (const auto& a : adapters_)
    if (a.target.layer == layer && a.target.proj == proj) return &a;
  return nullptr;
}

std::vector<at::Tensor> TextEncoderLora::parameters() const {
  std::vector<at::Tensor> p;
  for (const auto& a : adapters_) {
    p.push_back(a.A);
    p.push_back(a.B);
  }
  return p;
}

std::vector<at::Tensor> TextEncoderLora::layer_parameters(int layer) const {
  std::vector<at::Tensor> p;
  for (const auto& a : adapters_)
    if (a.target.layer == layer) {
      p.push_back(a.A);
      p.push_back(a.B);
    }
  return p;
}

TensorMap TextEncoderLora::state(const std::string& prefix) const {
  TensorMap m;
  for (const auto& a : adapters_) {
    m[prefix + a.target.module + ".lora_A.weight"] = a.A.detach().to(at::kCPU).contiguous();
    m[prefix + a.target.module + ".lora_B.weight"] = a.B.detach().to(at::kCPU).contiguous();
  }
  return m;
}

std::string kohya_text_module(const std::string& kohya_prefix, const std::string& module) {
  std::string m = module;
  for (char& c : m)
    if (c == '.') c = '_';
  return kohya_prefix + "_" + m;
}

TensorMap TextEncoderLora::kohya_state(const std::string& kohya_prefix) const {
  TensorMap m;
  for (const auto& a : adapters_) {
    const std::string stem = kohya_text_module(kohya_prefix, a.target.module);
    m[stem + ".lora_down.weight"] = a.A.detach().to(at::kCPU).contiguous();
    m[stem + ".lora_up.weight"] = a.B.detach().to(at::kCPU).contiguous();
    m[stem + ".alpha"] = at::scalar_tensor(alpha_, at::kFloat);
  }
  return m;
}

namespace {

at::Tensor need_lora(const TensorMap& t, const std::string& name, const std::string& source) {
  auto it = t.find(name);
  if (it == t.end()) throw Error(source + ": missing text encoder LoRA tensor '" + name + "'");
  return it->second;
}

void no_extra_keys(const TensorMap& t, const std::string& prefix, const std::vector<TextLoraAdapter>& adapters,
                   const std::string& source) {
  for (const auto& kv : t) {
    if (kv.first.compare(0, prefix.size(), prefix) != 0) continue;
    bool known = false;
    for (const auto& a : adapters)
      known = known || kv.first == prefix + a.target.module + ".lora_A.weight" ||
              kv.first == prefix + a.target.module + ".lora_B.weight";
    if (!known) throw Error(source + ": unexpected text encoder LoRA tensor '" + kv.first + "'");
  }
}

}  // namespace

void TextEncoderLora::load_state(const TensorMap& tensors, const std::string& prefix, const std::string& source) {
  no_extra_keys(tensors, prefix, adapters_, source);
  at::NoGradGuard no_grad;
  for (auto& a : adapters_) {
    const std::string stem = prefix + a.target.module;
    at::Tensor A = need_lora(tensors, stem + ".lora_A.weight", source);
    at::Tensor B = need_lora(tensors, stem + ".lora_B.weight", source);
    if (A.sizes() != a.A.sizes() || B.sizes() != a.B.sizes())
      throw Error(source + ": text encoder LoRA '" + stem + "' has A " + std::to_string(A.size(0)) + "x" +
                  std::to_string(A.dim() > 1 ? A.size(1) : 0) + ", expected " + std::to_string(a.A.size(0)) + "x" +
                  std::to_string(a.A.size(1)) + " (different rank or model?)");
    a.A.copy_(A);
    a.B.copy_(B);
  }
}

TextEncoderLora TextEncoderLora::from_state(const std::vector<TextLoraTarget>& targets, const TensorMap& tensors,
                                            const std::string& prefix, double alpha, const std::string& source) {
  check_input(!targets.empty(), source + ": no LoRA targets");
  const at::Tensor A0 = need_lora(tensors, prefix + targets[0].module + ".lora_A.weight", source);
  check_input(A0.dim() == 2, source + ": lora_A tensors must be 2-D");
  TextEncoderLora l = create(targets, A0.size(0), alpha > 0 ? alpha : static_cast<double>(A0.size(0)), 0);
  l.load_state(tensors, prefix, source);
  return l;
}

void TextEncoderLora::to(const at::Device& device, at::ScalarType master_dtype) {
  for (auto& a : adapters_) {
    a.A = a.A.detach().to(device, master_dtype).set_requires_grad(true);
    a.B = a.B.detach().to(device, master_dtype).set_requires_grad(true);
  }
}

at::Tensor linear_lora(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const TextLoraAdapter* adapter, double scale) {
  at::Tensor y = at::linear(x, weight, bias);
  if (adapter) {
    const at::Tensor A = adapter->A.to(x.scalar_type()), B = adapter->B.to(x.scalar_type());
    y = y + at::linear(at::linear(x, A), B) * scale;
  }
  return y;
}

}  // namespace fluxtrain
