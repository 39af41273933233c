#include "dist/encoder_rank.h"

#include <cstring>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/autograd.h>

#include "core/error.h"
#include "dist/communicator.h"

namespace fluxtrain::dist {

namespace {

constexpr int64_t kAlignBytes = 16;  // every tensor starts aligned for any dtype's view

// A list of sample maps as two tensors: JSON metadata (CPU bytes: per sample, per key the
// dtype, shape and byte offset) and the concatenated tensor bytes on `device`.
struct Packed {
  at::Tensor meta, data;
};

Packed pack(const SampleMaps& samples, at::Device device) {
  nlohmann::json j = nlohmann::json::array();
  int64_t end = 0;
  std::vector<std::pair<int64_t, at::Tensor>> pieces;
  for (const TensorMap& m : samples) {
    nlohmann::json s = nlohmann::json::object();
    for (const auto& [key, t] : m) {
      if (!t.defined()) continue;
      const int64_t nbytes = t.numel() * t.element_size();
      s[key] = {{"dtype", static_cast<int>(t.scalar_type())}, {"shape", t.sizes().vec()}, {"offset", end}};
      if (nbytes > 0) pieces.emplace_back(end, t);
      end += (nbytes + kAlignBytes - 1) / kAlignBytes * kAlignBytes;
    }
    j.push_back(std::move(s));
  }
  const std::string text = j.dump();
  Packed p;
  p.meta = at::empty({static_cast<int64_t>(text.size())}, at::kByte);
  std::memcpy(p.meta.data_ptr(), text.data(), text.size());
  p.data = at::zeros({end}, at::TensorOptions().dtype(at::kByte).device(device));
  at::NoGradGuard no_grad;
  for (const auto& [off, t] : pieces) {
    at::Tensor bytes = t.detach().contiguous().reshape({-1}).view(at::kByte);
    p.data.narrow(0, off, bytes.numel()).copy_(bytes);
  }
  return p;
}

SampleMaps unpack(const at::Tensor& meta, const at::Tensor& data, bool leaves_require_grad) {
  const std::string text(static_cast<const char*>(meta.data_ptr()), static_cast<size_t>(meta.numel()));
  const nlohmann::json j = nlohmann::json::parse(text);
  SampleMaps out;
  at::NoGradGuard no_grad;
  for (const auto& s : j) {
    TensorMap m;
    for (const auto& [key, v] : s.items()) {
      const auto dt = static_cast<at::ScalarType>(v.at("dtype").get<int>());
      const std::vector<int64_t> shape = v.at("shape").get<std::vector<int64_t>>();
      int64_t numel = 1;
      for (int64_t d : shape) numel *= d;
      const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(dt));
      at::Tensor t;
      if (nbytes == 0) t = at::empty(shape, data.options().dtype(dt));
      else t = data.narrow(0, v.at("offset").get<int64_t>(), nbytes).view(dt).view(shape).detach();
      // Views share the received buffer; a leaf that will get a gradient gets its own memory.
      if (leaves_require_grad && at::isFloatingType(dt)) t = t.clone().requires_grad_(true);
      m.emplace(key, t);
    }
    out.push_back(std::move(m));
  }
  return out;
}

}  // namespace

EncoderRank::EncoderRank(Communicator& comm, int encoder_rank, at::Device device)
    : comm_(comm), encoder_rank_(encoder_rank), device_(device) {
  check_input(encoder_rank >= 0 && encoder_rank < comm.size(),
              "--encoder_rank " + std::to_string(encoder_rank) + " is not one of the " + std::to_string(comm.size()) +
                  " ranks");
}

bool EncoderRank::is_encoder() const { return comm_.rank() == encoder_rank_; }

SampleMaps EncoderRank::forward(const SampleMaps& local_inputs, const EncodeFn& encode, bool requires_grad) {
  const int root = encoder_rank_, N = comm_.size();
  Packed mine = pack(local_inputs, device_);
  std::vector<at::Tensor> metas = comm_.gather(mine.meta, root);
  std::vector<at::Tensor> datas = comm_.gather(mine.data, root);

  std::vector<at::Tensor> out_meta, out_data;
  if (is_encoder()) {
    SampleMaps global;
    std::vector<size_t> counts;
    for (int r = 0; r < N; ++r) {
      SampleMaps part = unpack(metas[r], datas[r], false);
      counts.push_back(part.size());
      global.insert(global.end(), part.begin(), part.end());
    }
    SampleMaps outputs;
    {
      at::AutoGradMode grad(requires_grad);
      outputs = encode(global);
    }
    // Checked on the encoder rank only; a throw here reaches the top level, whose fatal()
    // ends every rank (the others are waiting in the scatter below).
    check_input(outputs.size() == global.size(),
                "encoder rank: the encoder returned " + std::to_string(outputs.size()) + " outputs for " +
                    std::to_string(global.size()) + " samples");
    kept_.assign(N, {});
    size_t at = 0;
    for (int r = 0; r < N; ++r) {
      SampleMaps part(outputs.begin() + at, outputs.begin() + at + counts[r]);
      at += counts[r];
      Packed p = pack(part, device_);
      out_meta.push_back(p.meta);
      out_data.push_back(p.data);
      if (requires_grad) kept_[r] = std::move(part);
    }
    if (!requires_grad) kept_.clear();
  }
  at::Tensor meta = comm_.scatter(out_meta, root);
  at::Tensor data = comm_.scatter(out_data, root);
  return unpack(meta, data, requires_grad);
}

SampleMaps EncoderRank::grads_of(const SampleMaps& outputs) {
  SampleMaps g;
  for (const TensorMap& m : outputs) {
    TensorMap gm;
    for (const auto& [k, t] : m)
      if (t.defined() && t.grad().defined()) gm.emplace(k, t.grad());
    g.push_back(std::move(gm));
  }
  return g;
}

void EncoderRank::backward(const SampleMaps& local_grads, double scale) {
  const int root = encoder_rank_, N = comm_.size();
  Packed mine = pack(local_grads, device_);
  std::vector<at::Tensor> metas = comm_.gather(mine.meta, root);
  std::vector<at::Tensor> datas = comm_.gather(mine.data, root);
  if (!is_encoder()) return;
  check_input(static_cast<int>(kept_.size()) == N,
              "encoder rank: backward() without a forward(requires_grad=true) before it");
  std::vector<at::Tensor> outs, grads;
  for (int r = 0; r < N; ++r) {
    SampleMaps g = unpack(metas[r], datas[r], false);
    check_input(g.size() == kept_[r].size(),
                "encoder rank: rank " + std::to_string(r) + " sent gradients for " + std::to_string(g.size()) +
                    " samples, it has " + std::to_string(kept_[r].size()));
    for (size_t s = 0; s < g.size(); ++s)
      for (const auto& [key, grad] : g[s]) {
        auto it = kept_[r][s].find(key);
        check_input(it != kept_[r][s].end(), "encoder rank: gradient for unknown output '" + key + "'");
        if (!it->second.requires_grad()) continue;
        check_input(grad.sizes() == it->second.sizes(), "encoder rank: gradient for '" + key + "' has the wrong shape");
        outs.push_back(it->second);
        grads.push_back(grad.to(it->second.device(), it->second.scalar_type()) * scale);
      }
  }
  kept_.clear();
  if (!outs.empty()) torch::autograd::backward(outs, grads);
}

}  // namespace fluxtrain::dist
