// Encoder rank with a small stand-in "text encoder" (embedding + linear + tanh, per sample,
// variable-length token ids): what each rank receives equals what it would compute itself on
// the global batch, and the encoder's parameter gradient from the gathered conditioning
// gradients equals the gradient of the mean of the ranks' losses computed in one process.
#include <torch/csrc/autograd/autograd.h>

#include "dist/encoder_rank.h"
#include "tests/mpi/dist_test_util.h"

namespace fluxtrain::dist::testing {
namespace {

constexpr int64_t kVocab = 17, kDim = 6;

struct StandIn {
  at::Tensor emb, w;  // frozen embedding, (optionally trainable) projection
  explicit StandIn(bool trainable) {
    emb = rand_for(1, 0, {kVocab, kDim}, at::kDouble);
    w = rand_for(2, 0, {kDim, kDim}, at::kDouble);
    if (trainable) w.requires_grad_(true);
  }
  int calls = 0;
  SampleMaps operator()(const SampleMaps& in) {
    ++calls;
    SampleMaps out;
    for (const TensorMap& s : in) {
      at::Tensor h = at::tanh(at::linear(emb.index_select(0, s.at("ids")), w));  // [L, D]
      out.push_back({{"txt", h}, {"pooled", h.mean(0) * s.at("scale")}, {"mask", at::ones({h.size(0)}, at::kBool)}});
    }
    return out;
  }
};

// Rank r has r == 1 ? 0 : r + 1 samples (rank 1 none), each with its own length.
SampleMaps inputs_of(int rank) {
  SampleMaps s;
  const int n = rank == 1 ? 0 : rank + 1;
  for (int j = 0; j < n; ++j) {
    auto gen = at::detail::createCPUGenerator(100 * rank + j);
    at::Tensor ids = at::randint(0, kVocab, {3 + (j + rank) % 4}, gen, at::TensorOptions().dtype(at::kLong));
    s.push_back({{"ids", ids}, {"scale", at::scalar_tensor(1.0 + 0.5 * j, at::kDouble)}});
  }
  return s;
}

// Rank r's loss on its outputs: sum of <txt, R> + <pooled, Q> with fixed random R, Q.
at::Tensor loss_of(int rank, const SampleMaps& outs) {
  at::Tensor loss = at::zeros({}, at::kDouble);
  for (size_t j = 0; j < outs.size(); ++j) {
    const at::Tensor& t = outs[j].at("txt");
    loss = loss + (t * rand_for(300 + 10 * rank + j, rank, t.sizes(), at::kDouble)).sum() +
           (outs[j].at("pooled") * rand_for(400 + 10 * rank + j, rank, {kDim}, at::kDouble)).sum();
  }
  return loss;
}

TEST(DistEncoderRank, ScatterGivesEachRankItsOwnConditioning) {
  Communicator& c = comm();
  for (int root : {0, c.size() - 1}) {
    StandIn enc(false);
    EncoderRank er(c, root);
    SampleMaps got = er.forward(inputs_of(c.rank()), [&](const SampleMaps& in) { return enc(in); });
    EXPECT_EQ(enc.calls, c.rank() == root ? 1 : 0);  // only the encoder rank runs the module
    // Reference: this rank computes the whole global batch itself and takes its samples.
    StandIn local(false);
    SampleMaps global;
    size_t first = 0;
    for (int r = 0; r < c.size(); ++r) {
      SampleMaps part = inputs_of(r);
      if (r < c.rank()) first += part.size();
      global.insert(global.end(), part.begin(), part.end());
    }
    SampleMaps all = local(global);
    SampleMaps want(all.begin() + first, all.begin() + first + inputs_of(c.rank()).size());
    EXPECT_EQ(got.size(), want.size());
    for (size_t j = 0; j < std::min(got.size(), want.size()); ++j) {
      EXPECT_EQ(got[j].size(), 3u);
      for (const auto& [k, t] : want[j]) EXPECT_TRUE(bit_equal(got[j].at(k), t)) << "sample " << j << " " << k;
      EXPECT_FALSE(got[j].at("txt").requires_grad());
    }
  }
}

TEST(DistEncoderRank, GradientsComeBackToTheEncoder) {
  Communicator& c = comm();
  const int N = c.size();
  for (int root : {0, N - 1}) {
    StandIn enc(true);
    EncoderRank er(c, root);
    SampleMaps outs = er.forward(inputs_of(c.rank()), [&](const SampleMaps& in) { return enc(in); }, true);
    for (const auto& m : outs) EXPECT_TRUE(m.at("txt").requires_grad());
    if (!outs.empty()) loss_of(c.rank(), outs).backward();
    er.backward(EncoderRank::grads_of(outs), 1.0 / N);

    // Reference: one process, the mean of all ranks' losses, plain autograd.
    StandIn ref(true);
    at::Tensor total = at::zeros({}, at::kDouble);
    for (int r = 0; r < N; ++r) {
      SampleMaps o = ref(inputs_of(r));
      total = total + loss_of(r, o);
    }
    (total / N).backward();
    if (c.rank() == root) {
      EXPECT_TRUE(enc.w.grad().defined());
      if (enc.w.grad().defined()) {
        EXPECT_TRUE(close(enc.w.grad(), ref.w.grad(), 1e-12, 1e-12 * ref.w.grad().abs().max().item<double>()));
      }
    } else {
      EXPECT_FALSE(enc.w.grad().defined()) << "only the encoder rank runs the encoder's backward";
    }
  }
}

}  // namespace
}  // namespace fluxtrain::dist::testing
