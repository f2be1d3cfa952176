// GPT2Config: presets against transformers' parameter counts, config.json parsing and errors.
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "gpt2ft/core/error.h"
#include "gpt2ft/model/config.h"
#include "gpt2ft/model/gpt2.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

using nlohmann::json;

nlohmann::json golden_summary() {
  std::ifstream in(test::golden_dir() / "shapes.json");
  EXPECT_TRUE(in.good()) << "no shapes.json under GPT2FT_GOLDEN_DIR";
  return json::parse(in);
}

TEST(Config, PresetParameterCountsMatchTransformers) {
  const json counts = golden_summary()["preset_parameters"];
  ASSERT_EQ(counts.size(), GPT2Config::preset_names().size());
  for (const auto& name : GPT2Config::preset_names()) {
    EXPECT_EQ(GPT2Config::preset(name).num_parameters(), counts.at(name).get<int64_t>()) << name;
  }
}

TEST(Config, ModuleParameterCountMatchesConfigAndTransformers) {
  const json summary = golden_summary();  // alive while its "shapes" are iterated
  for (const auto& shape : summary["shapes"]) {
    const std::string name = shape["shape"];
    const GPT2Config config = GPT2Config::from_file(test::golden_dir() / name / "model" / "config.json");
    GPT2 model(config);
    int64_t n = 0;
    for (const auto& p : model->parameters()) n += p.numel();
    EXPECT_EQ(n, config.num_parameters()) << name;
    EXPECT_EQ(n, shape["parameters"].get<int64_t>()) << name;
  }
}

TEST(Config, ReadsTheFieldsAndKeepsUnknownOnes) {
  const json j = {{"model_type", "gpt2"}, {"n_layer", 3},          {"n_head", 3},
                  {"n_embd", 48},         {"n_ctx", 77},           {"vocab_size", 257},
                  {"n_inner", nullptr},   {"activation_function", "gelu"},
                  {"tie_word_embeddings", false}, {"task_specific_params", {{"x", 1}}}};
  const GPT2Config c = GPT2Config::from_json(j, "config.json");
  EXPECT_EQ(c.n_positions, 77);
  EXPECT_EQ(c.inner_dim(), 4 * 48);
  EXPECT_EQ(c.activation(), Activation::kGelu);
  EXPECT_FALSE(c.tie_word_embeddings);
  const json back = c.to_json();
  EXPECT_EQ(back["task_specific_params"]["x"], 1);
  EXPECT_EQ(back["n_positions"], 77);
  EXPECT_EQ(GPT2Config::from_json(back, "round trip").to_json(), back);
}

// Special ids: absent means GPT-2's 50256 (as transformers' GPT2Config), null means none and
// stays null when written back; an id outside the vocabulary can be dropped.
TEST(Config, SpecialTokenIdsKeepNullAndDropWhatTheVocabularyLacks) {
  const json base = {{"n_layer", 1}, {"n_head", 2}, {"n_embd", 8}, {"vocab_size", 300}, {"n_positions", 16}};
  GPT2Config absent = GPT2Config::from_json(base, "absent");
  EXPECT_EQ(absent.eos_token_id, std::optional<int64_t>(50256));
  json with_null = base;
  with_null["bos_token_id"] = nullptr;
  with_null["eos_token_id"] = 7;
  const GPT2Config nulls = GPT2Config::from_json(with_null, "null");
  EXPECT_EQ(nulls.bos_token_id, std::nullopt);
  EXPECT_EQ(nulls.eos_token_id, std::optional<int64_t>(7));
  EXPECT_TRUE(nulls.to_json()["bos_token_id"].is_null());
  EXPECT_EQ(nulls.to_json()["eos_token_id"], 7);
  EXPECT_TRUE(absent.drop_special_ids_outside_vocab());
  EXPECT_EQ(absent.bos_token_id, std::nullopt);
  EXPECT_EQ(absent.eos_token_id, std::nullopt);
  GPT2Config kept = nulls;
  EXPECT_FALSE(kept.drop_special_ids_outside_vocab());
  EXPECT_EQ(kept.eos_token_id, std::optional<int64_t>(7));
}

TEST(Config, BadValuesNameTheKeyAndTheProblem) {
  struct Case {
    json patch;
    std::vector<std::string> fragments;
  };
  const std::vector<Case> cases = {
      {{{"n_embd", 50}, {"n_head", 4}}, {"cfg.json", "n_embd (50) must be divisible by n_head (4)"}},
      {{{"activation_function", "gelu_magic"}}, {"cfg.json", "activation_function", "gelu_magic", "gelu_new"}},
      {{{"n_layer", "twelve"}}, {"cfg.json", "n_layer: expected an integer, got \"twelve\""}},
      {{{"n_head", 0}}, {"n_head: expected an integer in [1, 8], got 0"}},
      {{{"n_embd", int64_t{1} << 40}}, {"cfg.json", "n_embd: expected an integer in [1, 65536]"}},
      {{{"n_layer", 1000000000}}, {"cfg.json", "n_layer: expected an integer in [1, 4096]"}},
      {{{"resid_pdrop", 1.5}}, {"resid_pdrop", "probability"}},
      {{{"model_type", "llama"}}, {"model_type", "\"llama\""}},
      {{{"reorder_and_upcast_attn", true}}, {"reorder_and_upcast_attn", "not supported"}},
      {{{"tie_word_embeddings", "yes"}}, {"tie_word_embeddings: expected true or false"}},
  };
  for (const auto& c : cases) {
    json j = {{"n_layer", 2}, {"n_head", 2}, {"n_embd", 8}, {"vocab_size", 10}};
    j.update(c.patch);
    SCOPED_TRACE(c.patch.dump());
    try {
      GPT2Config::from_json(j, "cfg.json");
      ADD_FAILURE() << "accepted";
    } catch (const Error& e) {
      for (const auto& f : c.fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
    }
  }
  test::expect_error_containing([] { GPT2Config::preset("gpt3"); }, {"gpt3", "gpt2-medium"});
}

}  // namespace
}  // namespace gpt2ft
