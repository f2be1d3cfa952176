// safetensors writer/reader round trips and the reader's validation of corrupt files.
#include <cstring>
#include <fstream>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "gpt2ft/core/error.h"
#include "gpt2ft/io/safetensors.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

// Writes raw bytes: an 8-byte length, the header text, then `data_bytes` zero bytes.
void write_raw(const std::filesystem::path& path, const std::string& header, size_t data_bytes) {
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header;
  out << std::string(data_bytes, '\0');
}

TEST(Safetensors, RoundTripsEveryFloatDtypeAndShape) {
  test::TempDir tmp;
  torch::manual_seed(0);
  const NamedTensors tensors = {
      {"f32", torch::randn({3, 5})},
      {"f16", torch::randn({7}).to(torch::kHalf)},
      {"bf16", torch::randn({2, 3, 4}).to(torch::kBFloat16)},
      {"i64", torch::arange(10, torch::kLong)},
      {"scalar", torch::tensor(3.5f).reshape({})},
      {"empty", torch::empty({0, 4})},
  };
  save_safetensors(tmp.path() / "t.safetensors", tensors);
  SafetensorsReader reader(tmp.path() / "t.safetensors");
  EXPECT_EQ(reader.entries().size(), tensors.size());
  EXPECT_EQ(reader.metadata().at("format"), "pt");
  for (const auto& [name, t] : tensors) {
    torch::Tensor back = reader.load(name);
    EXPECT_EQ(back.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(back.sizes(), t.sizes()) << name;
    EXPECT_TRUE(torch::equal(back, t)) << name;
  }
  EXPECT_EQ(reader.entry("bf16").dtype, "BF16");
  // Conversion on load: bf16 -> f32 is exact.
  EXPECT_TRUE(torch::equal(reader.load("bf16", torch::kFloat), tensors[2].second.to(torch::kFloat)));
}

TEST(Safetensors, SavingReplacesTheFileOnlyWhenComplete) {
  test::TempDir tmp;
  const auto path = tmp.path() / "t.safetensors";
  save_safetensors(path, {{"a", torch::ones({2})}});
  // A tensor that cannot be stored fails the save; the old file must survive untouched.
  EXPECT_THROW(save_safetensors(path, {{"a", torch::zeros({2})}, {"c", torch::zeros({2}, torch::kComplexFloat)}}), Error);
  EXPECT_TRUE(torch::equal(SafetensorsReader(path).load("a"), torch::ones({2})));
  size_t files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(tmp.path())) ++files;
  EXPECT_EQ(files, 1u) << "a temporary file was left behind";
}

TEST(Safetensors, RejectsCorruptFilesWithTheReason) {
  test::TempDir tmp;
  const auto p = tmp.path() / "bad.safetensors";
  auto expect = [&](std::initializer_list<std::string> fragments) {
    test::expect_error_containing([&] { SafetensorsReader r(p); }, fragments);
  };
  { std::ofstream(p, std::ios::binary) << "abc"; }
  expect({p.string(), "truncated"});

  write_raw(p, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 0);
  expect({p.string(), "\"a\"", "outside the data section"});

  write_raw(p, R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8);
  expect({"\"a\"", "needs 12 bytes", "span 8"});

  write_raw(p, R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8);
  expect({"\"a\"", "unsupported dtype \"Q4\""});

  write_raw(p, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8);
  expect({"overlap"});

  write_raw(p, R"({"a": [1, 2)", 0);
  expect({p.string(), "JSON header does not parse"});

  {  // header length larger than the file
    std::ofstream out(p, std::ios::binary);
    const uint64_t n = 1ull << 40;
    out.write(reinterpret_cast<const char*>(&n), 8);
  }
  expect({"header length", "does not fit"});

  test::expect_error_containing([&] { SafetensorsReader r(tmp.path() / "missing.safetensors"); },
                                {"missing.safetensors", "cannot open"});
}

}  // namespace
}  // namespace gpt2ft
