// Shared helpers of the subcommands: option parsing that turns Boost errors into one-line
// fluxtrain errors, dtype/device names.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include <boost/program_options/options_description.hpp>
#include <boost/program_options/variables_map.hpp>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

namespace fluxtrain {

// Parses argv (argv[0] = the subcommand name) into vm and runs notify(). Returns false when
// --help was given (help already printed to stdout).
bool parse_command_line(const std::string& command, const boost::program_options::options_description& desc,
                        int argc, char** argv, boost::program_options::variables_map& vm);

// "f32"/"float32", "f64"/"float64", "bf16"/"bfloat16", "f16"/"float16"; throws naming flag.
at::ScalarType parse_dtype(const std::string& s, const std::string& flag);
// "cpu", "cuda", "cuda:N"; throws naming flag, or when CUDA is asked for but absent.
c10::Device parse_device(const std::string& s, const std::string& flag);

// A prompts file: one prompt a line; "\n", "\t" and "\\" inside a line stand for newline, tab
// and backslash (defined in cli_encode.cpp; `encode` and `sample` read the same format).
std::vector<std::string> read_prompts_file(const std::string& path);

// Checked before any work, so that a bad output path costs nothing and damages nothing: an
// output file named by `flag` must not be a directory, its folder must exist (and be a folder),
// and it must not be the same file as one of `inputs` ("--output X: is the same file as --input").
void check_output_file(const std::string& flag, const std::string& path,
                       const std::vector<std::pair<std::string, std::string>>& inputs = {});
// An output folder (made if missing): the path, or its nearest existing ancestor, must be a folder.
void check_output_dir(const std::string& flag, const std::string& path);

}  // namespace fluxtrain
