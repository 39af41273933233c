// fluxtrain train: LoRA training (src/train/trainer.h); options in src/core/config.h.
#include <iostream>

#include "cli/commands.h"
#include "core/config.h"
#include "train/trainer.h"

namespace fluxtrain {

int cmd_train(int argc, char** argv) {
  ParsedArgs a = parse_train_args(argc, argv, std::cout);
  if (a.help) return 0;
  Trainer trainer(a.config);
  const std::string lora = trainer.run();
  std::cout << lora << "\n";  // last line: the LoRA file (the quickstart prints it)
  return 0;
}

}  // namespace fluxtrain
