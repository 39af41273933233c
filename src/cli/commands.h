// Subcommands of the `fluxtrain` binary. Each parses its own options (Boost.Program_options)
// and returns the process exit code; errors are thrown as fluxtrain::Error and printed by main.
#pragma once

namespace fluxtrain {
int cmd_init_model(int argc, char** argv);
int cmd_forward(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_train(int argc, char** argv);
int cmd_synth_data(int argc, char** argv);
int cmd_estimate(int argc, char** argv);
int cmd_doctor(int argc, char** argv);
int cmd_vae(int argc, char** argv);
int cmd_prepare(int argc, char** argv);
int cmd_image(int argc, char** argv);
int cmd_encode(int argc, char** argv);
int cmd_convert_lora(int argc, char** argv);
int cmd_sample(int argc, char** argv);
}  // namespace fluxtrain
