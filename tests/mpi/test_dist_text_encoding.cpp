// Text encoding through the encoder rank (src/encoders/distributed_text_encoding.h) with the tiny
// CLIP and T5 in float64: each rank receives exactly the conditioning a single process computes
// for the global batch, and the text-encoder LoRA gradients after the gather-back equal the
// one-process gradient of the mean of the ranks' losses (1e-12), in both training modes.
// Ranks other than the encoder rank load no encoder (they pass nullptr).
#include <unistd.h>

#include <cstdlib>

#include "core/fs.h"
#include "encoders/distributed_text_encoding.h"
#include "encoders/tiny_text_encoders.h"
#include "tests/mpi/dist_test_util.h"

namespace fluxtrain::dist::testing {
namespace {

constexpr int64_t kLen = 12;

// Rank r has (r == 1 ? 0 : r + 1) captions (rank 1 none).
std::vector<std::string> captions_of(int rank) {
  const char* words[] = {"a photo of", "cat", "dog", "in a bucket", "oil painting", "", "8k", "sks"};
  std::vector<std::string> c;
  const int n = rank == 1 ? 0 : rank + 1;
  for (int j = 0; j < n; ++j) c.push_back(std::string(words[(rank + j) % 8]) + " " + words[(3 * rank + 2 * j) % 8]);
  return c;
}

at::Tensor loss_of(int rank, const TextEncoding& e) {
  if (e.prompt_embeds.size(0) == 0) return at::zeros({}, at::kDouble);
  return (e.prompt_embeds * rand_for(500 + rank, rank, e.prompt_embeds.sizes(), at::kDouble)).sum() +
         (e.pooled_prompt_embeds * rand_for(600 + rank, rank, e.pooled_prompt_embeds.sizes(), at::kDouble)).sum();
}

const std::string& snapshot() {
  static std::string dir = [] {
    char tmpl[] = "/tmp/fluxtrain_te_mpi_XXXXXX";
    std::string d = mkdtemp(tmpl);
    write_tiny_text_encoders(d, 16, 32, 11, at::kFloat);
    std::atexit([] { remove_tree(snapshot()); });
    return d;
  }();
  return dir;
}

TextEncoders load(bool both) {
  TextEncoderOptions o;
  o.train_text_encoder = both;
  o.train_text_encoder_one_only = !both;
  o.text_encoder_rank = 3;
  o.text_encoder_alpha = 5;
  o.max_sequence_length = kLen;
  TextEncoders e = TextEncoders::load(TextEncoderSetup::for_training(snapshot(), o, at::kDouble, at::kCPU, 4, false));
  e.clip_lora().to(at::kCPU, at::kDouble);
  if (both) e.t5_lora().to(at::kCPU, at::kDouble);
  at::NoGradGuard ng;  // nonzero B so that every master has a gradient
  int k = 0;
  for (TextEncoderLora* l : {&e.clip_lora(), &e.t5_lora()})
    for (auto& a : l->adapters()) a.B.copy_(rand_for(700 + k++, 0, a.B.sizes(), at::kDouble) * 0.1);
  return e;
}

TEST(DistTextEncoding, ScatterAndLoraGradientsEqualOneProcess) {
  Communicator& c = comm();
  const int N = c.size();
  for (bool both : {false, true}) {
    for (int root : {0, N - 1}) {
      std::unique_ptr<TextEncoders> enc;
      if (c.rank() == root) enc = std::make_unique<TextEncoders>(load(both));
      DistributedTextEncoding dte(c, root, enc.get(), /*train_clip=*/true, /*train_t5=*/both);
      TextEncoding got = dte.forward(captions_of(c.rank()));
      if (got.prompt_embeds.size(0) > 0) loss_of(c.rank(), got).backward();
      dte.backward(1.0 / N);

      // One process: the global batch through its own copy, the mean of every rank's loss.
      TextEncoders ref = load(both);
      std::vector<std::string> global;
      size_t first = 0;
      for (int r = 0; r < N; ++r) {
        auto part = captions_of(r);
        if (r < c.rank()) first += part.size();
        global.insert(global.end(), part.begin(), part.end());
      }
      TextEncoding all = ref.encode(global);
      const int64_t mine = static_cast<int64_t>(captions_of(c.rank()).size());
      if (mine > 0) {
        EXPECT_TRUE(bit_equal(got.prompt_embeds, all.prompt_embeds.narrow(0, first, mine)));
        EXPECT_TRUE(bit_equal(got.pooled_prompt_embeds, all.pooled_prompt_embeds.narrow(0, first, mine)));
        EXPECT_EQ(got.prompt_embeds.requires_grad(), both);
      }
      at::Tensor total = at::zeros({}, at::kDouble);
      size_t at = 0;
      for (int r = 0; r < N; ++r) {
        const int64_t n = static_cast<int64_t>(captions_of(r).size());
        TextEncoding part{{}, {}, all.pooled_prompt_embeds.narrow(0, at, n), all.prompt_embeds.narrow(0, at, n)};
        total = total + loss_of(r, part);
        at += n;
      }
      (total / N).backward();
      if (c.rank() == root) {
        auto pa = enc->clip_lora_parameters(), pb = ref.clip_lora_parameters();
        for (auto& p : enc->t5_lora_parameters()) pa.push_back(p);
        for (auto& p : ref.t5_lora_parameters()) pb.push_back(p);
        ASSERT_EQ(pa.size(), pb.size());
        EXPECT_EQ(pa.size(), both ? 32u : 16u);
        for (size_t i = 0; i < pa.size(); ++i) {
          ASSERT_TRUE(pa[i].grad().defined()) << i;
          const double scale = pb[i].grad().abs().max().item<double>();
          EXPECT_GT(scale, 0) << i;
          EXPECT_TRUE(close(pa[i].grad(), pb[i].grad(), 1e-12, 1e-12 * scale)) << "param " << i;
        }
      } else {
        EXPECT_EQ(enc, nullptr);  // no encoder weights on this rank
      }
      ASSERT_TRUE(all_ranks(!::testing::Test::HasFailure()));
    }
  }
}

}  // namespace
}  // namespace fluxtrain::dist::testing
