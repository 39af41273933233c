// Declarative options. Each part of fluxtrain declares its own options once, beside the struct
// they fill (model/lora_options.cpp, train/run_config.cpp, ...): name, bound field, default (the
// field's value when it is declared), help text and range/choice rule. From that one list come
// the Boost.Program_options declarations (--help), parsing of the command line and INI files,
// validation with one-line errors naming the flag, and the resolved JSON stored in checkpoints.
// core/ knows no model types: the table only knows strings, numbers, booleans and lists.
#pragma once
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace fluxtrain {

// Rules: called with the flag as typed ("--ranks") and the value; throw Error when it is bad.
template <class T>
using Rule = std::function<void(const std::string& flag, const T& value)>;

namespace rules {
Rule<int64_t> positive();        // "--X must be positive, got N"
Rule<int64_t> non_negative();    // "--X must be >= 0, got N"
Rule<int64_t> at_most(int64_t hi, const std::string& why);  // "--X N is above the limit of HI (why)"
Rule<int64_t> multiple_of_16();  // image sizes: 8x VAE downsampling, 2x2 patches
Rule<int64_t> in_range(int64_t lo, int64_t hi);  // "--X must be in [lo, hi], got N" (core/limits.h)
Rule<double> positive_number(const std::string& what = "positive");  // finite and > 0
Rule<double> finite();
Rule<double> in_range(double lo, double hi, bool hi_open, const std::string& shown);  // "must be in ..."
Rule<std::string> one_of(std::vector<std::string> choices);  // "--X must be one of a | b, got 'c'"
template <class T>
Rule<T> both(Rule<T> a, Rule<T> b) {
  return [a, b](const std::string& f, const T& v) {
    a(f, v);
    b(f, v);
  };
}
}  // namespace rules

// One help group ("Model", "LoRA", ...). Options are added with the JSON section they belong
// to (section()), which need not match the help group ("General" holds options of several).
class OptionGroup {
 public:
  explicit OptionGroup(std::string title, std::string json_section = "");
  OptionGroup& section(const std::string& json_section);  // for the options added next
  OptionGroup& hidden();  // the options added next are parsed but not shown in --help or JSON

  OptionGroup& add(const std::string& name, std::string* v, const std::string& help, Rule<std::string> rule = {});
  OptionGroup& add(const std::string& name, int64_t* v, const std::string& help, Rule<int64_t> rule = {});
  OptionGroup& add(const std::string& name, int* v, const std::string& help, Rule<int64_t> rule = {});
  OptionGroup& add(const std::string& name, double* v, const std::string& help, Rule<double> rule = {},
                   const std::string& shown_default = "");
  // Booleans: --name alone means true; --name=true/false or INI "name = false" also work.
  OptionGroup& add(const std::string& name, bool* v, const std::string& help);
  // Lists: "64,64", "64 64" or several tokens; each item is checked by the rule.
  OptionGroup& add(const std::string& name, std::vector<int64_t>* v, const std::string& help,
                   Rule<int64_t> rule = {});
  OptionGroup& add(const std::string& name, std::vector<int>* v, const std::string& help, Rule<int64_t> rule = {});
  OptionGroup& add(const std::string& name, std::vector<double>* v, const std::string& help, Rule<double> rule = {});
  OptionGroup& add(const std::string& name, std::vector<std::string>* v, const std::string& help);
  // An option whose text is converted by `set` (enums, signed seeds, ...); `json` gives its value.
  OptionGroup& add_custom(const std::string& name, const std::string& help, const std::string& shown_default,
                          std::function<void(const std::string& flag, const std::string& text)> set,
                          std::function<nlohmann::json()> json);
  // A second name for the option declared last (old flag names keep working; not in --help).
  OptionGroup& alias(const std::string& old_name);
  // Custom JSON value for the option declared last (enums stored as strings, ...).
  OptionGroup& to_json(std::function<nlohmann::json()> fn);

  struct Option;
  const std::string& title() const { return title_; }
  const std::vector<std::shared_ptr<Option>>& options() const { return options_; }

 private:
  std::string title_, section_;
  bool hidden_ = false;
  std::vector<std::shared_ptr<Option>> options_;
  OptionGroup& push(std::shared_ptr<Option> o);
};

// All groups of one subcommand. Parsing: command line first, then --config FILE (INI, where
// "[section]" headers are only for readability), the command line winning; unknown options,
// stray arguments and repeated flags are errors; no prefix guessing.
class OptionSet {
 public:
  explicit OptionSet(std::string command, std::string summary = "");
  OptionGroup& group(const std::string& title, const std::string& json_section = "");
  // Adds --config FILE (an INI file with any of the options) to the first group.
  void allow_config_file(std::string* path);

  // Parses and validates every rule. Returns false when --help was printed to `help_out`.
  bool parse(int argc, const char* const* argv, std::ostream& help_out);
  // True when the option was given (command line or INI), not defaulted.
  bool given(const std::string& name) const;
  // Re-runs every rule (after values were changed in code).
  void validate() const;
  nlohmann::json json() const;  // {section: {name: value}} of the visible options
  void print_help(std::ostream& out) const;

 private:
  std::string command_, summary_;
  std::vector<std::unique_ptr<OptionGroup>> groups_;
  std::string* config_path_ = nullptr;
  std::vector<std::string> given_;
};

}  // namespace fluxtrain
