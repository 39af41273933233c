// ShardedBlockWeights: bit-identical blocks, resident bytes ~ total/N, the two-slot protocol
// with prefetch, and forward+backward of a small stand-in model whose blocks re-acquire their
// weights in backward (the pattern the transformer uses for transient providers) against the
// same model computed with plain autograd on resident weights.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/autograd.h>

#include "core/error.h"
#include "dist/sharded_weights.h"
#include "tests/mpi/dist_test_util.h"

namespace fluxtrain::dist::testing {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Blocks with odd shapes and mixed dtypes; block 3 holds a single element (shorter than one
// shard unit: everything but rank 0's shard is padding); block 4 has an empty tensor.
std::vector<TensorMap> odd_blocks(uint64_t seed) {
  std::vector<TensorMap> b(6);
  for (int i = 0; i < 6; ++i) {
    auto r = [&](at::IntArrayRef s, at::ScalarType dt) { return rand_for(seed + 10 * i, 0, s, dt); };
    if (i == 3) {
      b[i]["only"] = r({1}, at::kDouble);
      continue;
    }
    b[i]["a.weight"] = r({37 + i, 13}, at::kDouble);
    b[i]["a.bias"] = r({37 + i}, at::kDouble);
    b[i]["norm.scale"] = rand_for(seed + 10 * i + 1, 0, {7}, at::kFloat);
    b[i]["zz.bf16"] = rand_for(seed + 10 * i + 2, 0, {3, 129}, at::kBFloat16);
    if (i == 4) b[i]["empty"] = at::zeros({0, 5}, at::kDouble);
  }
  return b;
}

void expect_block_equal(const TensorMap& got, const TensorMap& want, int block) {
  EXPECT_EQ(got.size(), want.size()) << "block " << block;
  for (const auto& [name, t] : want) {
    auto it = got.find(name);
    EXPECT_TRUE(it != got.end()) << "block " << block << " lacks " << name;
    if (it != got.end()) {
      EXPECT_TRUE(bit_equal(it->second, t)) << "block " << block << " " << name;
    }
  }
}

TEST(DistMappedMemory, OneAllocationSeenAtSeveralAddresses) {
  // What the gather windows rely on: pieces of one allocation mapped into two ranges show the
  // same bytes, and a write through one range is visible through the other.
  auto mem = make_host_mapped_memory();
  const size_t g = mem->granularity();
  ASSERT_GT(g, 0u);
  const int a = mem->create(3 * g), b = mem->create(g);
  char* w0 = mem->reserve(2 * g);
  char* w1 = mem->reserve(2 * g);
  mem->map(w0, g, a, 0);      // w0 = [a0 | b]
  mem->map(w0 + g, g, b, 0);
  mem->map(w1, g, b, 0);      // w1 = [b | a2]
  mem->map(w1 + g, g, a, 2 * g);
  mem->map(w1, 0, a, 0);      // empty mapping: nothing happens
  for (size_t i = 0; i < g; ++i) w0[g + i] = static_cast<char>(i * 7 + 1);  // writes b via w0
  for (size_t i = 0; i < g; ++i) ASSERT_EQ(w1[i], static_cast<char>(i * 7 + 1)) << i;
  w1[g + 5] = 42;   // a's third granule
  w0[3] = 17;       // a's first granule
  EXPECT_EQ(w1[g + 5], 42);
  EXPECT_EQ(w0[3], 17);
  EXPECT_THROW(mem->create(g + 1), Error);  // not a multiple of the granularity
}

TEST(DistShardedWeights, BlocksAreBitIdenticalInAnyOrder) {
  auto blocks = odd_blocks(1);
  TensorMap globals{{"img_in.weight", rand_for(99, 0, {5, 3}, at::kDouble)}};
  ShardedBlockWeights w(comm(), globals, blocks, {});
  EXPECT_TRUE(w.transient());
  EXPECT_EQ(w.num_blocks(), 6);
  EXPECT_TRUE(bit_equal(w.globals().at("img_in.weight"), globals.at("img_in.weight")));
  std::vector<int> order{0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0, 3, 0, 5, 2, 2, 1, 4};
  for (int i : order) {
    expect_block_equal(w.acquire(i), blocks[i], i);
    w.release(i);
  }
  // Two blocks held at once (the documented maximum).
  const TensorMap& a = w.acquire(2);
  const TensorMap& b = w.acquire(4);
  expect_block_equal(a, blocks[2], 2);
  expect_block_equal(b, blocks[4], 4);
  w.release(2);
  w.release(4);
}

TEST(DistShardedWeights, CastsAndShardsWithLoader) {
  auto blocks = odd_blocks(2);
  int loads = 0;
  ShardedWeightsOptions opt;
  opt.dtype = at::kFloat;
  ShardedBlockWeights w(comm(), {}, 6, [&](int i) { ++loads; return blocks[i]; }, opt);
  EXPECT_EQ(loads, 6);  // each block loaded once
  for (int i = 0; i < 6; ++i) {
    TensorMap want;
    for (const auto& [n, t] : blocks[i]) want[n] = t.to(at::kFloat);
    expect_block_equal(w.acquire(i), want, i);
    w.release(i);
  }
}

TEST(DistShardedWeights, ResidentBytesAreAboutTotalOverN) {
  const int N = comm().size();
  // One large-ish block type (float64) so that padding is a small fraction.
  std::vector<TensorMap> blocks(4);
  for (int i = 0; i < 4; ++i) {
    blocks[i]["w1"] = rand_for(20 + i, 0, {601, 267}, at::kDouble);
    blocks[i]["w2"] = rand_for(30 + i, 0, {267, 601}, at::kDouble);
    blocks[i]["b"] = rand_for(40 + i, 0, {601}, at::kDouble);
  }
  TensorMap globals{{"g", at::zeros({10}, at::kDouble)}};
  ShardedBlockWeights w(comm(), globals, blocks, {});
  const ShardedWeightsStats& s = w.stats();
  const int64_t full = 4 * (601 * 267 * 2 + 601) * 8, block = full / 4;
  EXPECT_EQ(s.full_block_bytes, full);
  EXPECT_EQ(s.replicated_bytes, 80);
  // Padding: per tensor < kAlign elements; per block, each rank's part is rounded up to the
  // mapping granularity (< one granule per rank).
  const int64_t G = s.granularity;
  EXPECT_GT(G, 0);
  const int64_t align_pad = 3 * ShardedBlockWeights::kAlign * 8;
  EXPECT_GE(s.shard_bytes * N, full);
  EXPECT_LE(s.shard_bytes, 4 * ((block + align_pad + N - 1) / N + G));
  EXPECT_NEAR(static_cast<double>(s.shard_bytes), static_cast<double>(full) / N, 0.03 * full / N);
  // Two slots receive the other ranks' parts of one block: none with one rank.
  EXPECT_EQ(s.gather_buffer_bytes, 2 * (N - 1) * (s.shard_bytes / 4));
  EXPECT_EQ(s.resident_bytes(), s.shard_bytes + s.replicated_bytes + s.gather_buffer_bytes);
  // Every rank holds the same amount (even split).
  at::Tensor mine = at::full({1}, s.shard_bytes, at::kLong), mx = mine.clone();
  comm().all_reduce(mx, ReduceOp::Max);
  EXPECT_EQ(mx.item<int64_t>(), s.shard_bytes);
}

TEST(DistShardedWeights, ProtocolErrors) {
  auto blocks = odd_blocks(3);
  ShardedWeightsOptions opt;
  opt.prefetch = false;  // slot choice below is then exactly LRU
  ShardedBlockWeights w(comm(), {}, blocks, opt);
  w.acquire(0);
  w.acquire(1);
  EXPECT_THROW(w.acquire(2), Error);  // a third unsharded block
  EXPECT_THROW(w.acquire(1), Error);  // acquired twice
  w.release(0);
  EXPECT_THROW(w.release(0), Error);  // released twice
  EXPECT_THROW(w.release(5), Error);  // never acquired
  w.release(1);
  EXPECT_THROW(w.acquire(6), Error);  // out of range (no collective issued)

}

TEST(DistShardedWeights, TensorsKeepTheirIdentityAndFollowTheirBlock) {
  // What a stored autograd graph relies on: acquire(i) hands out the same tensor objects every
  // time, they show block i's values whenever block i is unsharded (whichever slot it is in),
  // and they are empty, never another block's weights, once their slot is reused.
  auto blocks = odd_blocks(6);
  ShardedWeightsOptions opt;
  opt.prefetch = false;
  ShardedBlockWeights w(comm(), {}, blocks, opt);
  at::Tensor kept = w.acquire(2).at("a.weight");
  at::Tensor kept_t = kept.t();  // a view of it
  EXPECT_TRUE(bit_equal(kept, blocks[2].at("a.weight")));
  w.release(2);
  w.acquire(0);  // other slot
  w.release(0);
  const void* first_home = kept.data_ptr();
  w.acquire(1);  // reuses block 2's slot (least recently used) and stays held
  EXPECT_EQ(kept.storage().nbytes(), 0u);
  EXPECT_EQ(kept_t.storage().nbytes(), 0u);
  const TensorMap& again = w.acquire(2);  // so block 2 comes back in the other slot
  EXPECT_NE(kept.data_ptr(), first_home);
  EXPECT_TRUE(again.at("a.weight").is_same(kept));
  EXPECT_TRUE(bit_equal(kept, blocks[2].at("a.weight")));
  EXPECT_TRUE(bit_equal(kept_t, blocks[2].at("a.weight").t()));
  w.release(2);
  w.release(1);
}

TEST(DistShardedWeights, PrefetchFollowsHintsForwardAndBackward) {
  const int n = 6;
  auto blocks = odd_blocks(4);
  ShardedBlockWeights w(comm(), {}, blocks, {});
  for (int i = 0; i < n; ++i) {  // forward, hint after acquire
    w.acquire(i);
    if (i + 1 < n) w.will_use(i + 1);
    w.release(i);
  }
  EXPECT_EQ(w.stats().gathers, n);
  EXPECT_EQ(w.stats().prefetch_hits, n - 1);
  for (int i = n - 1; i >= 0; --i) {  // backward: the last two blocks are still unsharded
    expect_block_equal(w.acquire(i), blocks[i], i);
    if (i > 0) w.will_use(i - 1);
    w.release(i);
  }
  EXPECT_EQ(w.stats().gathers, n + n - 2);
  EXPECT_EQ(w.stats().prefetch_hits, n - 1 + n);
  EXPECT_EQ(w.stats().wasted_prefetches, 0);
}

TEST(DistShardedWeights, PrefetchWithoutHintsFollowsDirection) {
  const int n = 6;
  auto blocks = odd_blocks(5);
  ShardedBlockWeights w(comm(), {}, blocks, {});
  for (int i = 0; i < n; ++i) {
    w.acquire(i);
    w.release(i);
  }
  EXPECT_EQ(w.stats().gathers, n);
  EXPECT_EQ(w.stats().prefetch_hits, n - 1);
  for (int i = n - 1; i >= 0; --i) {
    expect_block_equal(w.acquire(i), blocks[i], i);
    w.release(i);
  }
  // Turning around: n-1 and n-2 are still there; acquire(n-2) sets the direction, after
  // which every block is prefetched.
  EXPECT_EQ(w.stats().prefetch_hits, n - 1 + n);
}

// ---- stand-in model --------------------------------------------------------------------------
// h0 = x In^T;  h_{i+1} = h_i + tanh(h_i W1^T + b1 + s (h_i A_i^T) B_i^T) W2^T;  out = h Out^T.
constexpr int64_t kD = 24, kF = 40, kR = 3;

at::Tensor block_compute(const at::Tensor& h, const TensorMap& m, const at::Tensor& A, const at::Tensor& B) {
  at::Tensor pre = at::linear(h, m.at("w1"), m.at("b1")) + 0.5 * at::linear(at::linear(h, A), B);
  return h + at::linear(at::tanh(pre), m.at("w2"));
}

// A block whose weights are acquired in forward and again in backward (recompute); the
// provider may reuse the memory after each release.
struct TransientBlock : public torch::autograd::Function<TransientBlock> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor h, at::Tensor A, at::Tensor B, int64_t provider,
                            int64_t block) {
    auto* w = reinterpret_cast<BlockWeights*>(provider);
    at::Tensor y = block_compute(h, w->acquire(static_cast<int>(block)), A, B);
    w->release(static_cast<int>(block));
    ctx->save_for_backward({h, A, B});
    ctx->saved_data["provider"] = provider;
    ctx->saved_data["block"] = block;
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    auto* w = reinterpret_cast<BlockWeights*>(ctx->saved_data["provider"].toInt());
    const int block = static_cast<int>(ctx->saved_data["block"].toInt());
    auto saved = ctx->get_saved_variables();
    const TensorMap& m = w->acquire(block);
    if (block > 0) w->will_use(block - 1);
    variable_list g;
    {
      at::AutoGradMode enable(true);
      at::Tensor h = saved[0].detach().requires_grad_(true);
      at::Tensor A = saved[1].detach().requires_grad_(true);
      at::Tensor B = saved[2].detach().requires_grad_(true);
      at::Tensor y = block_compute(h, m, A, B);
      g = torch::autograd::grad({y}, {h, A, B}, {grad[0]});
    }
    w->release(block);
    return {g[0], g[1], g[2], at::Tensor(), at::Tensor()};
  }
};

struct ToyResult {
  at::Tensor out;
  std::vector<at::Tensor> grads;  // dL/dx, then dA_i, dB_i
};

ToyResult run_toy(BlockWeights& w, const at::Tensor& x0, const std::vector<at::Tensor>& lora, bool transient) {
  at::Tensor x = x0.detach().requires_grad_(true);
  std::vector<at::Tensor> p;
  for (const at::Tensor& t : lora) p.push_back(t.detach().requires_grad_(true));
  at::Tensor h = at::linear(x, w.globals().at("in.weight"));
  for (int i = 0; i < w.num_blocks(); ++i) {
    if (transient) {
      h = TransientBlock::apply(h, p[2 * i], p[2 * i + 1], reinterpret_cast<int64_t>(&w), int64_t{i});
    } else {
      h = block_compute(h, w.acquire(i), p[2 * i], p[2 * i + 1]);
      w.release(i);
    }
  }
  at::Tensor out = at::linear(h, w.globals().at("out.weight"));
  at::Tensor loss = (out * out).sum() + out.sum();
  loss.backward();
  ToyResult r{out.detach(), {x.grad()}};
  for (const at::Tensor& t : p) r.grads.push_back(t.grad());
  return r;
}

class PlainResident : public BlockWeights {
 public:
  PlainResident(TensorMap g, std::vector<TensorMap> b) : g_(std::move(g)), b_(std::move(b)) {}
  const TensorMap& globals() override { return g_; }
  int num_blocks() const override { return static_cast<int>(b_.size()); }
  const TensorMap& acquire(int i) override { return b_.at(i); }
  void release(int) override {}
 private:
  TensorMap g_;
  std::vector<TensorMap> b_;
};

TEST(DistShardedWeights, StandInModelForwardBackwardMatchesResident) {
  const int n = 5;
  TensorMap globals{{"in.weight", rand_for(50, 0, {kD, 11}, at::kDouble) * 0.3},
                    {"out.weight", rand_for(51, 0, {7, kD}, at::kDouble) * 0.3}};
  std::vector<TensorMap> blocks(n);
  std::vector<at::Tensor> lora;
  for (int i = 0; i < n; ++i) {
    blocks[i]["w1"] = rand_for(60 + i, 0, {kF, kD}, at::kDouble) * 0.2;
    blocks[i]["b1"] = rand_for(70 + i, 0, {kF}, at::kDouble) * 0.1;
    blocks[i]["w2"] = rand_for(80 + i, 0, {kD, kF}, at::kDouble) * 0.2;
    lora.push_back(rand_for(90 + i, 0, {kR, kD}, at::kDouble) * 0.3);
    lora.push_back(rand_for(95 + i, 0, {kF, kR}, at::kDouble) * 0.3);
  }
  at::Tensor x = rand_for(49, comm().rank(), {2, 9, 11}, at::kDouble);  // per-rank data

  PlainResident resident(globals, blocks);
  ToyResult ref = run_toy(resident, x, lora, /*transient=*/false);
  ShardedBlockWeights sharded(comm(), globals, blocks, {});
  ToyResult got = run_toy(sharded, x, lora, /*transient=*/true);

  EXPECT_TRUE(close(got.out, ref.out, 1e-12, 1e-12 * ref.out.abs().max().item<double>()));
  ASSERT_EQ(got.grads.size(), ref.grads.size());
  for (size_t k = 0; k < ref.grads.size(); ++k) {
    double scale = ref.grads[k].abs().max().item<double>();
    EXPECT_GT(scale, 0) << "gradient " << k << " is zero: the test would not see a wrong weight";
    EXPECT_TRUE(close(got.grads[k], ref.grads[k], 1e-12, 1e-12 * scale)) << "gradient " << k;
  }
  // Backward re-gathered blocks in descending order with prefetch: forward n gathers, backward
  // n-2 (the last two blocks were still unsharded when backward started).
  EXPECT_EQ(sharded.stats().gathers, 2 * n - 2);
  EXPECT_EQ(sharded.stats().wasted_prefetches, 0);
}

}  // namespace
}  // namespace fluxtrain::dist::testing
