// The overrides' store, their names and valid values, and the one reading of the environment
// (overrides.h).
#include "overrides.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <stdexcept>

#include "cpu/cpu_features.h"

namespace fused_rnn {
namespace {

// An override by name: words (the value is a word's index) or a whole number in [low, high].
struct Definition {
  Override which;
  const char* name;
  std::vector<std::string> words;  // empty for a number
  int64_t low, high, initial;
};

const std::vector<Definition>& definitions() {
  static const std::vector<Definition> table = {
      {Override::kFloatKernel, "float_kernel", {"auto", "amx", "avx512", "avx2"}, 0, 0, kFloatAuto},
      {Override::kChunkGemm, "chunk_gemm", {"auto", "tiles", "blas"}, 0, 0, kChunkGemmAuto},
      {Override::kInt8Kernel, "int8_kernel", {"auto", "vnni", "avx2", "scalar"}, 0, 0, kInt8Auto},
      {Override::kAmxStepRows, "amx_step_rows", {}, 1, int64_t{1} << 40, 16},
      {Override::kCpuCacheMb, "cpu_cache_mb", {}, 0, int64_t{1} << 40, 1024},
      {Override::kCudaPersistent, "cuda_persistent", {"auto", "1", "0"}, 0, 0, kPersistentAuto},
      {Override::kCudaUnfusedBackward, "cuda_unfused_backward", {"0", "1"}, 0, 0, 0},
      {Override::kCudaRowsPerBlock, "cuda_rows_per_block", {}, 0, 1024, 0},
  };
  return table;
}

std::string environment_name(const Definition& d) {
  std::string name = "FUSED_RNN_";
  for (const char ch : std::string(d.name)) name += static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return name;
}

std::string joined(const std::vector<std::string>& words) {
  std::string out;
  for (const std::string& w : words) out += (out.empty() ? "" : ", ") + w;
  return out;
}

// The words of a word-valued override that this CPU can run.
std::vector<std::string> runnable_words(const Definition& d) {
  const cpu::CpuFeatures& f = cpu::cpu_features();
  std::vector<std::string> words;
  for (size_t i = 0; i < d.words.size(); ++i) {
    const auto v = static_cast<int64_t>(i);
    if (d.which == Override::kFloatKernel &&
        ((v == kFloatAmx && !cpu::amx_granted()) || (v == kFloatAvx512 && !f.avx512) || (v == kFloatAvx2 && !f.avx2_build))) {
      continue;
    }
    if (d.which == Override::kInt8Kernel && ((v == kInt8Vnni && !f.vnni) || (v == kInt8Avx2 && !f.avx2_build))) {
      continue;
    }
    words.push_back(d.words[i]);
  }
  return words;
}

// The value of `text` for d, where `source` names where it came from (for the message).
int64_t parse(const Definition& d, const std::string& text, const std::string& source) {
  if (!d.words.empty()) {
    for (size_t i = 0; i < d.words.size(); ++i) {
      if (text != d.words[i]) continue;
      const std::vector<std::string> runnable = runnable_words(d);
      if (std::find(runnable.begin(), runnable.end(), text) == runnable.end()) {
        throw std::invalid_argument("fused_rnn: " + source + "='" + text + "' asks for a kernel this CPU (or this "
                                    "build) cannot run; here it can be one of " + joined(runnable));
      }
      return static_cast<int64_t>(i);
    }
    throw std::invalid_argument("fused_rnn: " + source + "='" + text + "' is not valid; it must be one of " +
                                joined(d.words));
  }
  // Digits only (no sign, no spaces), and at most 13 of them: no overflow, and [low, high] decides.
  const bool digits = !text.empty() && text.size() <= 13 &&
                      std::all_of(text.begin(), text.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  const long long number = digits ? std::strtoll(text.c_str(), nullptr, 10) : -1;
  if (number < d.low || number > d.high) {
    throw std::invalid_argument("fused_rnn: " + source + "='" + text + "' is not valid; it must be a whole number "
                                "from " + std::to_string(d.low) + " to " + std::to_string(d.high) +
                                (d.which == Override::kCpuCacheMb ? " (megabytes; 0 turns the CPU block cache off)"
                                                                  : ""));
  }
  return number;
}

const Definition& definition(const std::string& name) {
  for (const Definition& d : definitions()) {
    if (name == d.name) return d;
  }
  std::vector<std::string> names;
  for (const Definition& d : definitions()) names.push_back(d.name);
  throw std::invalid_argument("fused_rnn: no override named '" + name + "'; the overrides are " + joined(names));
}

// The store, filled from the environment on first use (when the extension loads: bindings.cpp).
OverrideValues& store() {
  static OverrideValues values;
  static const bool filled = [] {
    for (const Definition& d : definitions()) {
      const std::string variable = environment_name(d);
      const char* text = std::getenv(variable.c_str());
      values[static_cast<int>(d.which)] = text && *text ? parse(d, text, variable) : d.initial;
    }
    return true;
  }();
  (void)filled;
  return values;
}

}  // namespace

OverrideValues& override_values() { return store(); }

std::vector<std::pair<std::string, std::string>> overrides_by_name() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const Definition& d : definitions()) {
    const int64_t v = override_value(d.which);
    out.emplace_back(d.name, d.words.empty() ? std::to_string(v) : d.words[static_cast<size_t>(v)]);
  }
  return out;
}

void set_override(const std::string& name, const std::string& value) {
  const Definition& d = definition(name);
  store()[static_cast<int>(d.which)] = parse(d, value, name);
}

std::vector<std::pair<std::string, std::vector<std::string>>> override_choices() {
  std::vector<std::pair<std::string, std::vector<std::string>>> out;
  for (const Definition& d : definitions()) {
    if (!d.words.empty()) out.emplace_back(d.name, runnable_words(d));
  }
  return out;
}

}  // namespace fused_rnn
