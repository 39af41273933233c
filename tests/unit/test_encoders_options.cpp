// Text-encoder options: Boost.PO declarations parse the guide's flags, validate() names the flag.
#include <gtest/gtest.h>

#include <boost/program_options.hpp>

#include "core/error.h"
#include "encoders/text_encoder_options.h"

using namespace fluxtrain;
namespace po = boost::program_options;

namespace {

TextEncoderOptions parse(std::vector<const char*> args) {
  TextEncoderOptions o;
  po::options_description desc;
  add_text_encoder_options(desc, o);
  args.insert(args.begin(), "train");
  po::variables_map vm;
  po::store(po::parse_command_line(static_cast<int>(args.size()), args.data(), desc), vm);
  po::notify(vm);
  return o;
}

std::string error_of(const TextEncoderOptions& o) {
  try {
    o.validate();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(EncodersOptions, GuideFlagsParseAndValidate) {
  TextEncoderOptions d = parse({});
  EXPECT_FALSE(d.needs_encoders());
  EXPECT_EQ(d.text_encoder_rank, 64);
  EXPECT_EQ(d.max_sequence_length, 512);
  TextEncoderOptions o = parse({"--train_text_encoder_one_only", "--text_encoder_rank=16", "--text_encoder_alpha=8",
                                "--text_encoder_lr", "1e-5", "--text_encoder_device", "cpu", "--max_sequence_length",
                                "256"});
  EXPECT_TRUE(o.trains_clip());
  EXPECT_FALSE(o.trains_t5());
  EXPECT_TRUE(o.needs_encoders());
  EXPECT_EQ(o.text_encoder_rank, 16);
  EXPECT_EQ(o.text_encoder_alpha, 8);
  EXPECT_EQ(o.text_encoder_lr, 1e-5);
  EXPECT_EQ(o.max_sequence_length, 256);
  EXPECT_EQ(error_of(o), "");
  TextEncoderOptions both = parse({"--train_text_encoder"});
  EXPECT_TRUE(both.trains_clip() && both.trains_t5());

  TextEncoderOptions bad = parse({"--train_text_encoder", "--train_text_encoder_one_only"});
  EXPECT_NE(error_of(bad).find("contradict"), std::string::npos);
  bad = parse({"--text_encoder_rank", "0"});
  EXPECT_NE(error_of(bad).find("--text_encoder_rank"), std::string::npos);
  bad = parse({"--text_encoder_alpha", "-1"});
  EXPECT_NE(error_of(bad).find("--text_encoder_alpha"), std::string::npos);
  bad = parse({"--max_sequence_length", "513"});
  EXPECT_NE(error_of(bad).find("--max_sequence_length"), std::string::npos);
  bad = parse({"--text_encoder_device", "tpu"});
  EXPECT_NE(error_of(bad).find("--text_encoder_device"), std::string::npos);
}
