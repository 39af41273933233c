// Precompiled header: the heavy, stable headers most translation units need.
// Keep it to ATen + autograd basics; torch/torch.h (the whole C++ frontend) is deliberately absent.
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <nlohmann/json.hpp>
#include <map>
#include <memory>
#include <string>
#include <vector>
