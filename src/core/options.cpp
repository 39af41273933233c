#include "core/options.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <ostream>
#include <sstream>

#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/limits.h"

namespace po = boost::program_options;

namespace fluxtrain {

// ---- rules ---------------------------------------------------------------------------------
namespace rules {

Rule<int64_t> positive() {
  return [](const std::string& f, const int64_t& v) {
    if (v <= 0) throw Error(f + " must be positive, got " + std::to_string(v));
  };
}
Rule<int64_t> non_negative() {
  return [](const std::string& f, const int64_t& v) {
    if (v < 0) throw Error(f + " must be >= 0, got " + std::to_string(v));
  };
}
Rule<int64_t> at_most(int64_t hi, const std::string& why) {
  return [hi, why](const std::string& f, const int64_t& v) {
    if (v > hi) throw Error(f + " " + std::to_string(v) + " is above the limit of " + std::to_string(hi) + " (" + why + ")");
  };
}
Rule<int64_t> in_range(int64_t lo, int64_t hi) {
  return [lo, hi](const std::string& f, const int64_t& v) { limits::check_range(f, v, lo, hi); };
}
Rule<int64_t> multiple_of_16() {
  return [](const std::string& f, const int64_t& v) {
    if (v <= 0 || v % 16 != 0)
      throw Error(f + " " + std::to_string(v) +
                  " is not a positive multiple of 16 (8x VAE downsampling, 2x2 patches)");
  };
}
Rule<double> positive_number(const std::string& what) {
  return [what](const std::string& f, const double& v) {
    if (!std::isfinite(v) || v <= 0) throw Error(f + " must be " + what);
  };
}
Rule<double> finite() {
  return [](const std::string& f, const double& v) {
    if (!std::isfinite(v)) throw Error(f + " must be a finite number");
  };
}
Rule<double> in_range(double lo, double hi, bool hi_open, const std::string& shown) {
  return [=](const std::string& f, const double& v) {
    if (!(v >= lo && (hi_open ? v < hi : v <= hi))) throw Error(f + " must be in " + shown);
  };
}
Rule<std::string> one_of(std::vector<std::string> choices) {
  std::sort(choices.begin(), choices.end());
  return [choices](const std::string& f, const std::string& v) {
    if (std::find(choices.begin(), choices.end(), v) != choices.end()) return;
    std::string list;
    for (const auto& c : choices) list += (list.empty() ? "" : " | ") + c;
    throw Error(f + " must be one of " + list + ", got '" + v + "'");
  };
}

}  // namespace rules

// ---- one option ----------------------------------------------------------------------------
namespace {

// Splits "64,64" / "64 64" (INI values arrive as one token) into items.
std::vector<std::string> split_list(const std::vector<std::string>& tokens) {
  std::vector<std::string> out;
  for (const auto& t : tokens) {
    std::string cur;
    for (char c : t) {
      if (c == ',' || c == ' ' || c == '\t') {
        if (!cur.empty()) out.push_back(cur);
        cur.clear();
      } else {
        cur += c;
      }
    }
    if (!cur.empty()) out.push_back(cur);
  }
  return out;
}

// Integers must be whole and within int64 (no silent wrap-around); the caller's range rule
// and the field's own type bound the rest.
int64_t to_int(const std::string& flag, const std::string& s, int64_t lo, int64_t hi) {
  size_t pos = 0;
  long long v = 0;
  bool range = false;
  try {
    v = std::stoll(s, &pos);
  } catch (const std::out_of_range&) {
    range = true;
  } catch (...) {
    pos = 0;
  }
  if (range || (pos == s.size() && (v < lo || v > hi)))
    throw Error(flag + ": " + s + " is out of range (" + std::to_string(lo) + " to " + std::to_string(hi) + ")");
  if (pos == 0 || pos != s.size()) throw Error(flag + ": '" + s + "' is not an integer");
  return v;
}

double to_double(const std::string& flag, const std::string& s) {
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (const std::out_of_range&) {
    throw Error(flag + ": " + s + " is out of range of a double");
  } catch (...) {
    pos = 0;
  }
  if (pos == 0 || pos != s.size()) throw Error(flag + ": '" + s + "' is not a number");
  return v;
}

bool to_bool(const std::string& flag, const std::string& s) {
  if (s == "true" || s == "1" || s == "yes" || s == "on") return true;
  if (s == "false" || s == "0" || s == "no" || s == "off") return false;
  throw Error(flag + ": '" + s + "' is not a boolean (true or false)");
}

// Shortest text that reads back as the same double ("1e-4", "0.999", "600"); plain notation
// wins a tie.
std::string show_double(double v) {
  std::string best;
  for (int prec = 1; prec <= 17; ++prec) {
    std::ostringstream ss;
    ss.precision(prec);
    ss << v;
    std::string t = ss.str();
    const size_t e = t.find('e');
    if (e != std::string::npos) {  // "6e+02" -> "6e2", "1e-04" -> "1e-4"
      std::string mant = t.substr(0, e), ex = t.substr(e + 1);
      const bool neg = ex[0] == '-';
      if (ex[0] == '+' || ex[0] == '-') ex = ex.substr(1);
      while (ex.size() > 1 && ex[0] == '0') ex = ex.substr(1);
      t = mant + "e" + (neg ? "-" : "") + ex;
    }
    if (std::stod(t) != v) continue;
    if (best.empty() || t.size() < best.size() ||
        (t.size() == best.size() && best.find('e') != std::string::npos && t.find('e') == std::string::npos))
      best = t;
  }
  return best.empty() ? std::to_string(v) : best;
}

}  // namespace

struct OptionGroup::Option {
  std::string name, help, section;
  std::string typed;  // the name the user gave (an alias, or empty: not given)
  std::string flag() const { return typed.empty() ? name : typed; }
  std::vector<std::string> aliases;
  bool hidden = false, is_bool = false, is_list = false;
  std::string default_text;                                   // shown in --help; empty: none
  std::function<void(const std::vector<std::string>&)> set;   // parse tokens into the field
  std::function<void()> check;                                // run the rule on the field
  std::function<nlohmann::json()> json;
};

OptionGroup::OptionGroup(std::string title, std::string json_section)
    : title_(std::move(title)), section_(std::move(json_section)) {}

OptionGroup& OptionGroup::section(const std::string& s) {
  section_ = s;
  return *this;
}
OptionGroup& OptionGroup::hidden() {
  hidden_ = true;
  return *this;
}
OptionGroup& OptionGroup::push(std::shared_ptr<Option> o) {
  o->section = section_;
  o->hidden = hidden_;
  options_.push_back(std::move(o));
  return *this;
}
OptionGroup& OptionGroup::alias(const std::string& old_name) {
  options_.back()->aliases.push_back(old_name);
  return *this;
}
OptionGroup& OptionGroup::to_json(std::function<nlohmann::json()> fn) {
  options_.back()->json = std::move(fn);
  return *this;
}

OptionGroup& OptionGroup::add_custom(const std::string& name, const std::string& help,
                                     const std::string& shown_default,
                                     std::function<void(const std::string&, const std::string&)> set,
                                     std::function<nlohmann::json()> json) {
  auto o = std::make_shared<Option>();
  o->name = name, o->help = help, o->default_text = shown_default;
  o->set = [o = o.get(), set](const std::vector<std::string>& t) { set("--" + o->flag(), t.at(0)); };
  o->check = [] {};
  o->json = std::move(json);
  return push(o);
}

OptionGroup& OptionGroup::add(const std::string& name, std::string* v, const std::string& help,
                              Rule<std::string> rule) {
  auto o = std::make_shared<Option>();
  o->name = name, o->help = help, o->default_text = *v;
  o->set = [v](const std::vector<std::string>& t) { *v = t.at(0); };
  o->check = [v, rule, o = o.get()] {
    if (rule) rule("--" + o->flag(), *v);
  };
  o->json = [v] { return nlohmann::json(*v); };
  return push(o);
}

OptionGroup& OptionGroup::add(const std::string& name, int64_t* v, const std::string& help, Rule<int64_t> rule) {
  auto o = std::make_shared<Option>();
  o->name = name, o->help = help, o->default_text = std::to_string(*v);
  o->set = [v, o = o.get()](const std::vector<std::string>& t) {
    *v = to_int("--" + o->flag(), t.at(0), std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
  };
  o->check = [v, rule, o = o.get()] {
    if (rule) rule("--" + o->flag(), *v);
  };
  o->json = [v] { return nlohmann::json(*v); };
  return push(o);
}

OptionGroup& OptionGroup::add(const std::string& name, int* v, const std::string& help, Rule<int64_t> rule) {
  auto o = std::make_shared<Option>();
  o->name = name, o->help = help, o->default_text = std::to_string(*v);
  // The rule sees the value before it is narrowed to int, so that its range is what users read.
  o->set = [v, o = o.get(), rule](const std::vector<std::string>& t) {
    const int64_t x = to_int("--" + o->flag(), t.at(0), std::numeric_limits<int64_t>::min(),
                             std::numeric_limits<int64_t>::max());
    if (rule) rule("--" + o->flag(), x);
    *v = static_cast<int>(to_int("--" + o->flag(), t.at(0), std::numeric_limits<int>::min(),
                                 std::numeric_limits<int>::max()));
  };
  o->check = [v, rule, o = o.get()] {
    if (rule) rule("--" + o->flag(), *v);
  };
  o->json = [v] { return nlohmann::json(*v); };
  return push(o);
}

OptionGroup& OptionGroup::add(const std::string& name, double* v, const std::string& help, Rule<double> rule,
                              const std::string& shown_default) {
  auto o = std::make_shared<Option>();
  o->name = name, o->help = help, o->default_text = shown_default.empty() ? show_double(*v) : shown_default;
  o->set = [v, o = o.get()](const std::vector<std::string>& t) { *v = to_double("--" + o->flag(), t.at(0)); };
  o->check = [v, rule, o = o.get()] {
    if (rule) rule("--" + o->flag(), *v);
  };
  o->json = [v] { return nlohmann::json(*v); };
  return push(o);
}

OptionGroup& OptionGroup::add(const std::string& name, bool* v, const std::string& help) {
  auto o = std::make_shared<Option>();
  o->name = name, o->help = help, o->is_bool = true, o->default_text = *v ? "true" : "false";
  o->set = [v, o = o.get()](const std::vector<std::string>& t) { *v = to_bool("--" + o->flag(), t.at(0)); };
  o->check = [] {};
  o->json = [v] { return nlohmann::json(*v); };
  return push(o);
}

namespace {
template <class T>
std::string join(const std::vector<T>& v) {
  std::ostringstream ss;
  for (size_t i = 0; i < v.size(); ++i) ss << (i ? "," : "") << v[i];
  return ss.str();
}
}  // namespace

OptionGroup& OptionGroup::add(const std::string& name, std::vector<int64_t>* v, const std::string& help,
                              Rule<int64_t> rule) {
  auto o = std::make_shared<Option>();
  o->name = name, o->help = help, o->is_list = true, o->default_text = join(*v);
  o->set = [v, o = o.get()](const std::vector<std::string>& t) {
    v->clear();
    for (const auto& s : split_list(t))
      v->push_back(to_int("--" + o->flag(), s, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()));
  };
  o->check = [v, rule, o = o.get()] {
    if (rule)
      for (int64_t x : *v) rule("--" + o->flag(), x);
  };
  o->json = [v] { return nlohmann::json(*v); };
  return push(o);
}

OptionGroup& OptionGroup::add(const std::string& name, std::vector<int>* v, const std::string& help,
                              Rule<int64_t> rule) {
  auto o = std::make_shared<Option>();
  o->name = name, o->help = help, o->is_list = true, o->default_text = join(*v);
  o->set = [v, o = o.get(), rule](const std::vector<std::string>& t) {
    v->clear();
    for (const auto& s : split_list(t)) {
      const int64_t x = to_int("--" + o->flag(), s, std::numeric_limits<int64_t>::min(),
                               std::numeric_limits<int64_t>::max());
      if (rule) rule("--" + o->flag(), x);  // before narrowing
      v->push_back(static_cast<int>(
          to_int("--" + o->flag(), s, std::numeric_limits<int>::min(), std::numeric_limits<int>::max())));
    }
  };
  o->check = [v, rule, o = o.get()] {
    if (rule)
      for (int x : *v) rule("--" + o->flag(), x);
  };
  o->json = [v] { return nlohmann::json(*v); };
  return push(o);
}

OptionGroup& OptionGroup::add(const std::string& name, std::vector<double>* v, const std::string& help,
                              Rule<double> rule) {
  auto o = std::make_shared<Option>();
  o->name = name, o->help = help, o->is_list = true;
  std::vector<std::string> shown;
  for (double d : *v) shown.push_back(show_double(d));
  o->default_text = join(shown);
  o->set = [v, o = o.get()](const std::vector<std::string>& t) {
    v->clear();
    for (const auto& s : split_list(t)) v->push_back(to_double("--" + o->flag(), s));
  };
  o->check = [v, rule, o = o.get()] {
    if (rule)
      for (double x : *v) rule("--" + o->flag(), x);
  };
  o->json = [v] { return nlohmann::json(*v); };
  return push(o);
}

OptionGroup& OptionGroup::add(const std::string& name, std::vector<std::string>* v, const std::string& help) {
  auto o = std::make_shared<Option>();
  o->name = name, o->help = help, o->is_list = true, o->default_text = join(*v);
  o->set = [v](const std::vector<std::string>& t) { *v = split_list(t); };
  o->check = [] {};
  o->json = [v] { return nlohmann::json(*v); };
  return push(o);
}

// ---- the set -------------------------------------------------------------------------------
OptionSet::OptionSet(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

OptionGroup& OptionSet::group(const std::string& title, const std::string& json_section) {
  for (auto& g : groups_)
    if (g->title() == title) return g->section(json_section.empty() ? g->title() : json_section);
  groups_.push_back(std::make_unique<OptionGroup>(title, json_section));
  return *groups_.back();
}

void OptionSet::allow_config_file(std::string* path) { config_path_ = path; }

namespace {

// Boost declarations: every value is taken as text and converted by the option itself, so
// that messages are ours and integers never wrap around.
void declare(po::options_description& d, const OptionGroup::Option& o, const std::string& name, bool show_default) {
  if (o.is_bool) {
    auto* v = po::value<std::string>()->implicit_value("true")->value_name("BOOL");
    if (show_default) v->default_value(o.default_text);
    d.add_options()(name.c_str(), v, o.help.c_str());
  } else if (o.is_list) {
    auto* v = po::value<std::vector<std::string>>()->multitoken();
    if (show_default && !o.default_text.empty()) v->default_value({o.default_text}, o.default_text);
    d.add_options()(name.c_str(), v, o.help.c_str());
  } else {
    auto* v = po::value<std::string>();
    if (show_default && !o.default_text.empty()) v->default_value(o.default_text);
    d.add_options()(name.c_str(), v, o.help.c_str());
  }
}

// Option values end up in JSON (the resolved config printed at start and stored in every
// checkpoint), which holds text only: nlohmann's dump() throws on bytes that are not UTF-8.
bool valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
    if (c < 0x80) len = 1;
    else if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    else return false;
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k)
      if (p[i + k] < (k == 1 ? lo : 0x80) || p[i + k] > (k == 1 ? hi : 0xBF)) return false;
    i += len;
  }
  return true;
}

void check_text(const std::string& flag, const std::string& value) {
  if (!valid_utf8(value))
    throw Error(flag + ": '" + limits::printable(value, 60) + "' is not valid UTF-8 text");
}

[[noreturn]] void rethrow_po(const po::error& e, const std::string& where, const std::string& command) {
  std::string msg = e.what();
  if (auto* u = dynamic_cast<const po::unknown_option*>(&e))
    msg = "unknown option " + u->get_option_name() + " (fluxtrain " + command + " --help lists them)";
  throw Error(where.empty() ? msg : where + ": " + msg);
}

}  // namespace

void OptionSet::print_help(std::ostream& out) const {
  po::options_description visible(summary_.empty() ? "fluxtrain " + command_ : summary_);
  for (const auto& g : groups_) {
    po::options_description d(g->title());
    bool any = false;
    if (config_path_ && g == groups_.front()) {
      d.add_options()("help,h", "print this help and exit")(
          "config", po::value<std::string>()->value_name("FILE"),
          "INI file with any of these options (name = value; [sections] are only for readability); "
          "the command line wins");
      any = true;
    } else if (g == groups_.front()) {
      d.add_options()("help,h", "print this help and exit");
      any = true;
    }
    for (const auto& o : g->options())
      if (!o->hidden) {
        declare(d, *o, o->name, true);
        any = true;
      }
    if (any) visible.add(d);
  }
  out << visible << "\n";
}

bool OptionSet::parse(int argc, const char* const* argv, std::ostream& help_out) {
  // Everything is declared without defaults: a value in the map was given by the user.
  po::options_description all;
  all.add_options()("help,h", "");
  if (config_path_) all.add_options()("config", po::value<std::string>(), "");
  std::map<std::string, OptionGroup::Option*> by_name;
  for (const auto& g : groups_)
    for (const auto& o : g->options()) {
      declare(all, *o, o->name, false);
      by_name[o->name] = o.get();
      for (const auto& a : o->aliases) {
        declare(all, *o, a, false);
        by_name[a] = o.get();
      }
    }

  // No prefix guessing ("--rank" must not silently mean "--ranks"); no sticky short options.
  const int style = po::command_line_style::allow_long | po::command_line_style::long_allow_adjacent |
                    po::command_line_style::long_allow_next | po::command_line_style::allow_short |
                    po::command_line_style::short_allow_next | po::command_line_style::allow_dash_for_short;
  po::variables_map vm;
  try {
    auto parsed = po::command_line_parser(argc, const_cast<char**>(argv)).options(all).style(style)
                      .allow_unregistered().run();
    for (const auto& o : parsed.options) {
      if (o.position_key >= 0) {
        std::string hint = (o.value.size() == 1 && (o.value[0] == "true" || o.value[0] == "false"))
                               ? " (boolean flags take --flag or --flag=true/false)"
                               : "";
        throw Error("unexpected argument '" + (o.value.empty() ? std::string() : o.value[0]) + "'" + hint);
      }
      if (o.unregistered)
        throw Error("unknown option " + (o.original_tokens.empty() ? o.string_key : o.original_tokens[0]) +
                    " (fluxtrain " + command_ + " --help lists them)");
    }
    po::store(parsed, vm);
  } catch (const po::error& e) {
    rethrow_po(e, "", command_);
  }
  std::vector<std::string> from_command_line;
  for (const auto& kv : vm) from_command_line.push_back(kv.first);
  std::string ini_file;
  if (vm.count("help")) {
    print_help(help_out);
    return false;
  }
  if (config_path_ && vm.count("config")) {
    const std::string file = vm["config"].as<std::string>();
    check_text("--config", file);
    *config_path_ = file;
    ini_file = file;
    limits::check_config_file(file);  // a readable regular file
    std::ifstream in(file);
    if (!in) throw Error("--config " + file + ": cannot open file");
    try {
      auto parsed = po::parse_config_file<char>(in, all, /*allow_unregistered=*/true);
      for (auto& o : parsed.options) {
        if (!o.unregistered) {
          if (o.string_key == "config" || o.string_key == "help")
            throw Error(file + ": unknown option '" + o.string_key + "' (not allowed in an INI file)");
          continue;
        }
        // "[lora]\nranks = 64" arrives as "lora.ranks": sections are for readability only.
        std::string name = o.string_key.substr(o.string_key.rfind('.') + 1);
        if (name == "config" || name == "help" || !all.find_nothrow(name, false))
          throw Error(file + ": unknown option '" + o.string_key + "'");
        o.string_key = name;
        o.unregistered = false;
      }
      po::store(parsed, vm);  // keeps values already set on the command line
    } catch (const po::error& e) {
      rethrow_po(e, file, command_);
    }
  }
  // Convert what was given, in declaration order; every rule then checks the result.
  given_.clear();
  for (const auto& kv : vm) {
    auto it = by_name.find(kv.first);
    if (it == by_name.end()) continue;
    OptionGroup::Option* o = it->second;
    std::vector<std::string> tokens;
    if (o->is_list) tokens = kv.second.as<std::vector<std::string>>();
    else tokens = {kv.second.as<std::string>()};
    o->typed = kv.first;
    const bool from_ini = !ini_file.empty() && std::find(from_command_line.begin(), from_command_line.end(),
                                                         kv.first) == from_command_line.end();
    try {
      for (const auto& tok : tokens) check_text("--" + kv.first, tok);
      o->set(tokens);
    } catch (const Error& e) {
      if (!from_ini) throw;
      throw Error(ini_file + ": " + e.what());  // the value came from the INI file: name it
    }
    given_.push_back(o->name);
  }
  validate();
  return true;
}

bool OptionSet::given(const std::string& name) const {
  return std::find(given_.begin(), given_.end(), name) != given_.end();
}

void OptionSet::validate() const {
  for (const auto& g : groups_)
    for (const auto& o : g->options()) o->check();
}

nlohmann::json OptionSet::json() const {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& g : groups_)
    for (const auto& o : g->options())
      if (!o->hidden) j[o->section.empty() ? g->title() : o->section][o->name] = o->json();
  return j;
}

}  // namespace fluxtrain
