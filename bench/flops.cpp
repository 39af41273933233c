#include "bench/flops.h"

namespace fluxtrain {

double lora_step_flops(const FluxConfig& c, const StepShape& s) {
  const double H = static_cast<double>(c.hidden_size), M = static_cast<double>(c.mlp_hidden());
  double lc = 0, lc2 = 0;
  for (int64_t n : s.cond) {
    lc += static_cast<double>(n);
    lc2 += static_cast<double>(n) * n;
  }
  const double main = static_cast<double>(s.txt + s.noise);
  const double tokens = main + lc;
  // Per token MACs: double block qkv 3H^2 + proj H^2 + mlp 2HM; single block linear1 H(3H+M) + linear2 (H+M)H.
  const double dbl_macs = 4 * H * H + 2 * H * M, sgl_macs = H * (3 * H + M) + (H + M) * H;
  double linear = 2.0 * tokens * (c.depth * dbl_macs + c.depth_single * sgl_macs);
  linear += 2.0 * (s.noise + lc) * c.in_channels * H + 2.0 * s.txt * c.context_in_dim * H + 2.0 * s.noise * H * c.out_channels;
  const double attn = 4.0 * H * (main * (main + lc) + lc2) * (c.depth + c.depth_single);
  const double r = static_cast<double>(s.rank);
  double lora = 2.0 * lc * (c.depth * 4 * (H * r + r * H) + c.depth_single * 3 * (H * r + r * H));
  if (s.standard)
    lora = 2.0 * main * (c.depth * 4 * (H * r + r * H) +
                         c.depth_single * (3 * (H * r + r * H) + (H * r + r * M) + ((H + M) * r + r * H)));
  return s.batch * (2.0 * linear + 3.0 * attn + 3.0 * lora);
}

}  // namespace fluxtrain
