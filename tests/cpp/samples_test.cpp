// Document shards and packed samples (data/shard.h, data/samples.h): the format round trip and
// its damage checks, best-fit packing that keeps every document whole and once, and packed
// documents that never see each other in the model.
#include <algorithm>
#include <fstream>
#include <limits>
#include <map>
#include <random>

#include <gtest/gtest.h>

#include "gpt2ft/core/autocast.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/data/samples.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/model/init.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

constexpr uint32_t kEot = 96;

// Documents as tokenize writes them: eot, prompt, completion, eot; targets the completion and
// the closing eot. Returns the tokens; fills `docs`.
std::vector<uint32_t> make_documents(uint64_t seed, int count, int max_prompt, int max_completion,
                                     ShardDocuments& docs) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::vector<uint32_t> tokens;
  for (int d = 0; d < count; ++d) {
    const int p = static_cast<int>(rng() % (max_prompt + 1)), c = 1 + static_cast<int>(rng() % max_completion);
    docs.starts.push_back(static_cast<uint32_t>(tokens.size()));
    tokens.push_back(kEot);
    docs.targets.push_back(false);
    for (int i = 0; i < p + c; ++i) {
      tokens.push_back(rng() % kEot);
      docs.targets.push_back(i >= p);
    }
    tokens.push_back(kEot);
    docs.targets.push_back(true);
  }
  return tokens;
}

SampleOptions options_for(int64_t T, std::string too_long = "truncate") {
  SampleOptions o;
  o.seq_len = T;
  o.too_long = std::move(too_long);
  o.vocab_size = 97;
  return o;
}

TEST(Samples, DocumentShardsRoundTripAndRefuseDamage) {
  test::TempDir tmp;
  ShardDocuments docs;
  const auto tokens = make_documents(1, 30, 12, 9, docs);
  const auto path = tmp.path() / "train_000000.bin";
  write_shard(path, tokens, 2, &docs);
  {
    ShardReader r(path);
    ASSERT_TRUE(r.has_documents());
    ASSERT_EQ(r.num_tokens(), static_cast<int64_t>(tokens.size()));
    ASSERT_EQ(r.num_documents(), 30);
    for (int64_t d = 0; d < 30; ++d) EXPECT_EQ(r.document_start(d), docs.starts[static_cast<size_t>(d)]);
    EXPECT_EQ(r.document_end(29), r.num_tokens());
    for (int64_t i = 0; i < r.num_tokens(); ++i) {
      ASSERT_EQ(r.token(i), tokens[static_cast<size_t>(i)]);
      ASSERT_EQ(r.is_target(i), docs.targets[static_cast<size_t>(i)]) << "token " << i;
    }
  }
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const auto write_variant = [&](const std::string& name, const std::string& content) {
    std::ofstream(tmp.path() / name, std::ios::binary) << content;
    return tmp.path() / name;
  };
  std::string flipped = bytes;
  flipped[flipped.size() - 2] ^= 0x10;  // one target bit
  test::expect_error_containing([&] { ShardReader r(write_variant("flipped.bin", flipped)); },
                                {"flipped.bin", "target bits", "damaged"});
  // The target section lost: the tokens alone, as if the file were cut after them.
  test::expect_error_containing(
      [&] { ShardReader r(write_variant("cut.bin", bytes.substr(0, kShardHeaderBytes + 2 * tokens.size()))); },
      {"cut.bin", "30 documents", "truncated"});
  // Plain text and document shards do not mix in one set.
  write_shard(tmp.path() / "plain.bin", tokens, 2);
  test::expect_error_containing([&] { Samples s({path, tmp.path() / "plain.bin"}, options_for(32)); },
                                {"plain.bin", "one kind of shards"});
  SampleOptions documents = options_for(32);
  documents.packing = "documents";
  test::expect_error_containing([&] { Samples s({tmp.path() / "plain.bin"}, documents); },
                                {"plain text shards", "\"documents\""});
}

// Reads every packed row back and checks it against the documents written.
TEST(Samples, PacksEveryDocumentWholeAndOnceBestFit) {
  test::TempDir tmp;
  ShardDocuments docs_a, docs_b;
  const auto a = make_documents(2, 200, 40, 30, docs_a);  // some longer than T+1
  const auto b = make_documents(3, 50, 5, 5, docs_b);
  write_shard(tmp.path() / "train_000000.bin", a, 2, &docs_a);
  write_shard(tmp.path() / "train_000001.bin", b, 4, &docs_b);
  const std::vector<std::filesystem::path> paths = {tmp.path() / "train_000000.bin", tmp.path() / "train_000001.bin"};
  const int64_t T = 48;
  const Samples samples(paths, options_for(T));
  ASSERT_EQ(samples.packing(), Packing::kDocuments);
  ASSERT_TRUE(samples.has_targets());

  // The documents as (input ids, target ids) sequences, cut to T+1 tokens.
  std::multiset<std::vector<int64_t>> expected;
  int64_t truncated = 0, total_positions = 0;
  for (const auto& [tokens, docs] : {std::pair{&a, &docs_a}, {&b, &docs_b}}) {
    for (size_t d = 0; d < docs->starts.size(); ++d) {
      const size_t start = docs->starts[d], end = d + 1 < docs->starts.size() ? docs->starts[d + 1] : tokens->size();
      const size_t used = std::min<size_t>(end - start, T + 1);
      truncated += end - start > static_cast<size_t>(T + 1);
      std::vector<int64_t> seq;  // x then y of each position
      for (size_t i = 0; i + 1 < used; ++i) {
        seq.push_back((*tokens)[start + i]);
        seq.push_back(docs->targets[start + i + 1] ? (*tokens)[start + i + 1] : kIgnoreTarget);
      }
      total_positions += static_cast<int64_t>(used) - 1;
      expected.insert(seq);
    }
  }
  ASSERT_GT(truncated, 0);
  std::multiset<std::vector<int64_t>> found;
  std::vector<int64_t> x(T), y(T), pos(T);
  int64_t padding = 0;
  for (int64_t s = 0; s < samples.size(); ++s) {
    const int64_t targets = samples.read(s, x.data(), y.data(), pos.data());
    int64_t counted = 0;
    std::vector<int64_t> seq;
    for (int64_t t = 0; t < T; ++t) {
      counted += y[t] != kIgnoreTarget;
      if (t > 0 && pos[t] == 0 && !seq.empty()) found.insert(std::exchange(seq, {}));
      if (pos[t] == 0 && (t + 1 == T || pos[t + 1] == 0) && y[t] == kIgnoreTarget && x[t] == 0) {
        ++padding;  // padding: one position to itself, never a target
        continue;
      }
      ASSERT_EQ(pos[t], seq.size() / 2) << "sample " << s << " position " << t;
      seq.push_back(x[t]);
      seq.push_back(y[t]);
    }
    if (!seq.empty()) found.insert(seq);
    EXPECT_EQ(counted, targets);
    EXPECT_EQ(samples.targets(s), targets);
  }
  EXPECT_EQ(found, expected);
  EXPECT_EQ(padding, samples.size() * T - total_positions);
  // Best fit keeps padding low: fewer rows than 1.1x the lower bound.
  EXPECT_LE(samples.size(), static_cast<int64_t>(1.1 * std::ceil(double(total_positions) / T)) + 1);
  EXPECT_NE(samples.describe().find(std::to_string(truncated) + " cut to"), std::string::npos) << samples.describe();

  test::expect_error_containing([&] { Samples s(paths, options_for(T, "error")); },
                                {"train_000000.bin", "more than data.seq_len + 1 = 49", "data.too_long"});

  // Concat: windows over the stream, prompts still not targets.
  SampleOptions concat = options_for(T);
  concat.packing = "concat";
  const Samples windows(paths, concat);
  ASSERT_EQ(windows.packing(), Packing::kConcat);
  EXPECT_EQ(windows.size(), static_cast<int64_t>((a.size() - 1) / T + (b.size() - 1) / T));
  windows.read(1, x.data(), y.data(), nullptr);
  int64_t counted = 0;
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_EQ(x[t], a[static_cast<size_t>(T + t)]);
    EXPECT_EQ(y[t], docs_a.targets[static_cast<size_t>(T + t + 1)] ? a[static_cast<size_t>(T + t + 1)] : kIgnoreTarget);
    counted += y[t] != kIgnoreTarget;
  }
  EXPECT_EQ(windows.targets(1), counted);
}

// Per-token losses of a packed row: changing one document leaves every other one's bitwise
// unchanged, and each equals the document computed alone (positions from 0, nothing before it).
TEST(Samples, PackedDocumentsDoNotInteract) {
  test::TempDir tmp;
  ShardDocuments docs;
  auto tokens = make_documents(4, 40, 10, 8, docs);
  write_shard(tmp.path() / "a.bin", tokens, 2, &docs);
  // The same documents, the third one's tokens changed (same length: the packing is the same).
  for (size_t i = docs.starts[2] + 1; i + 1 < docs.starts[3]; ++i) tokens[i] = (tokens[i] + 17) % kEot;
  write_shard(tmp.path() / "b.bin", tokens, 2, &docs);
  const int64_t T = 32;
  const Samples sa({tmp.path() / "a.bin"}, options_for(T)), sb({tmp.path() / "b.bin"}, options_for(T));
  ASSERT_EQ(sa.size(), sb.size());
  const auto read_all = [&](const Samples& s) {
    torch::Tensor t = torch::empty({s.size(), 3, T}, torch::kLong);
    for (int64_t i = 0; i < s.size(); ++i) {
      int64_t* row = t[i].data_ptr<int64_t>();
      s.read(i, row, row + T, row + 2 * T);
    }
    return t;
  };
  const torch::Tensor ta = read_all(sa), tb = read_all(sb);  // (S, 3, T)
  const torch::Tensor changed = (ta.select(1, 0) != tb.select(1, 0)).any(1);  // rows that hold document 2
  ASSERT_EQ(changed.sum().item<int64_t>(), 1);

  GPT2Config c;
  c.n_layer = 2, c.n_head = 2, c.n_embd = 32, c.vocab_size = 97, c.n_positions = 64;
  c.resid_pdrop = c.embd_pdrop = c.attn_pdrop = 0;
  GPT2 model(c);
  init_gpt2_weights(model, 5);
  model->eval();
  torch::NoGradGuard no_grad;
  for (const auto dtype : {c10::kFloat, c10::kBFloat16}) {
    AutocastGuard autocast(c10::kCPU, dtype);
    const auto per_token = [&](const torch::Tensor& t) {  // (S, T) losses, 0 where no target
      const torch::Tensor logits = model->forward(t.select(1, 0), t.select(1, 2)).to(torch::kFloat);  // (S, T, V)
      const torch::Tensor y = t.select(1, 1);
      return torch::nn::functional::cross_entropy(
                 logits.reshape({-1, 97}), y.reshape({-1}),
                 torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kIgnoreTarget).reduction(torch::kNone))
          .view(y.sizes());
    };
    const torch::Tensor la = per_token(ta), lb = per_token(tb);
    const torch::Tensor document = ta.select(1, 2).eq(0).cumsum(1);  // (S, T)
    const int64_t row = changed.nonzero().item<int64_t>();
    const torch::Tensor doc_of_2 = (ta[row][0] != tb[row][0]).nonzero()[0][0];  // a position of document 2
    const torch::Tensor other = document[row] != document[row][doc_of_2.item<int64_t>()];
    EXPECT_TRUE(torch::equal(la.index({changed.logical_not()}), lb.index({changed.logical_not()})));
    EXPECT_TRUE(torch::equal(la[row].index({other}), lb[row].index({other})))
        << "a changed document moved another one's losses in the same row (" << c10::toString(dtype) << ")";
    EXPECT_FALSE(torch::equal(la[row], lb[row]));
    // Each document of row 0 alone, from position 0 with plain causal attention.
    const torch::Tensor pos = ta[0][2];
    for (int64_t start = 0; start < T;) {
      int64_t end = start + 1;
      while (end < T && pos[end].item<int64_t>() != 0) ++end;
      const torch::Tensor alone = model->forward(ta[0][0].narrow(0, start, end - start).unsqueeze(0)).to(torch::kFloat);
      const torch::Tensor packed = model->forward(ta.select(1, 0).narrow(0, 0, 1), ta.select(1, 2).narrow(0, 0, 1))
                                       .to(torch::kFloat)
                                       .narrow(1, start, end - start);
      EXPECT_LT(test::max_abs_diff(alone, packed), dtype == c10::kFloat ? 1e-5 : 0.1) << "document at " << start;
      start = end;
    }
  }
}

}  // namespace
}  // namespace gpt2ft

namespace gpt2ft {
namespace {

// The packed documents' mask, against the rule written out position by position: 0 where key
// s <= t lies in t's document, -inf elsewhere; its rows 16 values apart (so CUDA's
// memory-efficient attention takes it without copying it in every layer) at T=72 and T=64.
TEST(Samples, DocumentMaskFollowsTheRuleWithAlignedRows) {
  for (const int64_t T : {64, 72}) {
    torch::Tensor positions = torch::zeros({2, T}, torch::kLong);
    const int64_t lengths[] = {5, 30, 1, 20};
    for (int64_t b = 0; b < 2; ++b) {
      int64_t at = 0;
      for (const int64_t len : lengths) {
        for (int64_t i = 0; i < len && at < T; ++i) positions[b][at++] = i;
      }  // the rest: padding, a document of one token each
    }
    for (const auto dtype : {c10::kFloat, c10::kBFloat16}) {
      const torch::Tensor mask = document_attention_mask(positions, dtype);  // (2, 1, T, T)
      ASSERT_EQ(mask.sizes(), (std::vector<int64_t>{2, 1, T, T}));
      EXPECT_EQ(mask.stride(2) % 16, 0);
      EXPECT_EQ(mask.stride(1) % 16, 0);
      EXPECT_EQ(mask.stride(0) % 16, 0);
      EXPECT_EQ(document_mask_row(T), (T + 15) / 16 * 16);
      const torch::Tensor m = mask.to(torch::kFloat);
      for (int64_t b = 0; b < 2; ++b) {
        std::vector<int64_t> doc(static_cast<size_t>(T));
        for (int64_t t = 0, d = -1; t < T; ++t) doc[static_cast<size_t>(t)] = positions[b][t].item<int64_t>() == 0 ? ++d : d;
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t s = 0; s < T; ++s) {
            const bool allowed = s <= t && doc[static_cast<size_t>(s)] == doc[static_cast<size_t>(t)];
            const float v = m[b][0][t][s].item<float>();
            ASSERT_EQ(allowed ? 0.0f : -std::numeric_limits<float>::infinity(), v) << "T=" << T << " b=" << b << " t=" << t << " s=" << s;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace gpt2ft

namespace gpt2ft {
namespace {

// One preference example as tokenize writes it: eot + prompt + each continuation + eot.
void add_pair(const std::vector<uint32_t>& prompt, const std::vector<uint32_t>& chosen,
              const std::vector<uint32_t>& rejected, std::vector<uint32_t>& tokens, ShardDocuments& docs) {
  for (const auto* continuation : {&chosen, &rejected}) {
    docs.starts.push_back(static_cast<uint32_t>(tokens.size()));
    tokens.push_back(kEot);
    docs.targets.push_back(false);
    for (const uint32_t t : prompt) tokens.push_back(t), docs.targets.push_back(false);
    for (const uint32_t t : *continuation) tokens.push_back(t), docs.targets.push_back(true);
    tokens.push_back(kEot);
    docs.targets.push_back(true);
  }
  docs.pairs = true;
}

std::vector<uint32_t> range(uint32_t from, uint32_t count) {
  std::vector<uint32_t> out;
  for (uint32_t i = 0; i < count; ++i) out.push_back(from + i);
  return out;
}

TEST(Samples, PairsAreReadAsTwoRowsAndCutAtThePromptsBeginningFirst) {
  test::TempDir tmp;
  std::vector<uint32_t> tokens;
  ShardDocuments docs;
  add_pair(range(1, 3), range(10, 2), range(20, 4), tokens, docs);    // sides of 7 and 9 tokens: fits T+1 = 9
  add_pair(range(30, 6), range(40, 2), range(50, 3), tokens, docs);   // 10 and 11: 2 prompt tokens go
  add_pair(range(60, 2), range(70, 12), range(80, 1), tokens, docs);  // 16: the prompt but its last, then the end
  write_shard(tmp.path() / "p.bin", tokens, 2, &docs);
  const Samples s({tmp.path() / "p.bin"}, options_for(8));
  ASSERT_EQ(s.packing(), Packing::kPairs);
  ASSERT_EQ(s.size(), 3);
  ASSERT_EQ(s.sequences_per_sample(), 2);
  std::vector<int64_t> x(8), y(8);
  const auto row = [&](int64_t sample, int side) {
    const int64_t n = s.read_pair(sample, side, x.data(), y.data());
    return std::make_pair(n, std::vector<int64_t>(x.begin(), x.end()));
  };
  const int64_t I = kIgnoreTarget;
  // Example 0 fits: eot 1 2 3 10 11 eot, targets 10 11 eot (and for the rejected 20..23 eot).
  auto [n0, x0] = row(0, 0);
  EXPECT_EQ(n0, 3);
  EXPECT_EQ(x0, (std::vector<int64_t>{96, 1, 2, 3, 10, 11, 0, 0}));
  EXPECT_EQ(std::vector<int64_t>(y.begin(), y.end()), (std::vector<int64_t>{I, I, I, 10, 11, 96, I, I}));
  EXPECT_EQ(row(0, 1).first, 5);
  // Example 1: its longer side (11 tokens) is 2 over T+1 = 9: eot and 30 go from both sides,
  // which keep every target.
  auto [n1, x1] = row(1, 1);
  EXPECT_EQ(n1, 4);
  EXPECT_EQ(x1, (std::vector<int64_t>{31, 32, 33, 34, 35, 50, 51, 52}));
  EXPECT_EQ(std::vector<int64_t>(y.begin(), y.end()), (std::vector<int64_t>{I, I, I, I, 50, 51, 52, 96}));
  EXPECT_EQ(row(1, 0).second, (std::vector<int64_t>{31, 32, 33, 34, 35, 40, 41, 0}));
  // Example 2: 16 tokens; the prompt keeps only its last token (61), then the continuation's end goes.
  auto [n2, x2] = row(2, 0);
  EXPECT_EQ(n2, 8);
  EXPECT_EQ(x2, (std::vector<int64_t>{61, 70, 71, 72, 73, 74, 75, 76}));
  EXPECT_EQ(y[7], 77);
  EXPECT_EQ(row(2, 1).second, (std::vector<int64_t>{61, 80, 0, 0, 0, 0, 0, 0}));
  EXPECT_NE(s.describe().find("2 cut to fit"), std::string::npos) << s.describe();
  // data.too_long "error" names the example.
  try {
    Samples refused({tmp.path() / "p.bin"}, options_for(8, "error"));
    FAIL() << "a too-long example was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("example 1 of"), std::string::npos) << e.what();
  }
  // Another packing does not apply to pairs.
  SampleOptions concat = options_for(8);
  concat.packing = "concat";
  EXPECT_THROW(Samples({tmp.path() / "p.bin"}, concat), Error);
}

TEST(Samples, PreferenceShardsWithoutOneSharedPromptAreRefused) {
  test::TempDir tmp;
  std::vector<uint32_t> tokens;
  ShardDocuments docs;
  add_pair(range(1, 3), range(10, 2), range(20, 4), tokens, docs);
  tokens[docs.starts[1] + 2] = 7;  // the rejected side's prompt differs
  write_shard(tmp.path() / "bad.bin", tokens, 2, &docs);
  try {
    ShardReader reader(tmp.path() / "bad.bin");
    FAIL() << "pairs with two prompts were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("example 0 (documents 0 and 1) does not start its chosen and rejected"),
              std::string::npos)
        << e.what();
  }
  ShardDocuments odd;
  odd.starts = {0};
  odd.targets = {false, true};
  odd.pairs = true;
  EXPECT_THROW(write_shard(tmp.path() / "odd.bin", {96, 5}, 2, &odd), Error);
}

}  // namespace
}  // namespace gpt2ft

namespace gpt2ft {
namespace {

// Varlen attention's sequences, found on the host: hand-laid rows first, then every packed row
// of real document shards against the rule (a target's sequence is exactly its document; a
// row's trailing padding is one sequence).
TEST(Samples, PackedSequenceBoundsFollowTheDocumentsWithTrailingPaddingMerged) {
  constexpr int64_t I = kIgnoreTarget;
  // Row 0: a document of 3 positions, one of 1 (a target), 4 padding. Row 1: a document of 1
  // position without a target (a prompt token), one of 5 (targets from its second), 2 padding.
  const std::vector<int64_t> positions = {0, 1, 2, 0, 0, 0, 0, 0, /**/ 0, 0, 1, 2, 3, 4, 0, 0};
  const std::vector<int64_t> targets = {5, 6, 7, 8, I, I, I, I, /**/ I, I, 3, 4, 5, 6, I, I};
  std::vector<int32_t> cu(2 * 8 + 1, -1);
  int64_t max_len = 0;
  const int64_t D = packed_sequence_bounds(positions.data(), targets.data(), 2, 8, 8, cu.data(), max_len);
  EXPECT_EQ(D, 6);
  EXPECT_EQ(std::vector<int32_t>(cu.begin(), cu.begin() + D + 1), (std::vector<int32_t>{0, 3, 4, 8, 9, 14, 16}));
  EXPECT_EQ(max_len, 5);

  test::TempDir tmp;
  ShardDocuments docs;
  const auto tokens = make_documents(6, 120, 6, 12, docs);
  write_shard(tmp.path() / "a.bin", tokens, 2, &docs);
  const int64_t T = 40;
  const Samples samples({tmp.path() / "a.bin"}, options_for(T));
  const int64_t S = samples.size();
  torch::Tensor t = torch::empty({S, 3, T}, torch::kLong);
  for (int64_t i = 0; i < S; ++i) {
    int64_t* row = t[i].data_ptr<int64_t>();
    samples.read(i, row, row + T, row + 2 * T);
  }
  std::vector<int32_t> starts(static_cast<size_t>(S * T + 1));
  const int64_t n = packed_sequence_bounds(t.data_ptr<int64_t>() + 2 * T, t.data_ptr<int64_t>() + T, S, T, 3 * T,
                                           starts.data(), max_len);
  ASSERT_EQ(starts[0], 0);
  ASSERT_EQ(starts[static_cast<size_t>(n)], S * T);
  int64_t longest = 0, padded_rows = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t s = starts[static_cast<size_t>(k)], e = starts[static_cast<size_t>(k + 1)];
    ASSERT_LT(s, e);
    ASSERT_EQ(s / T, (e - 1) / T) << "sequence " << k << " crosses a row";
    longest = std::max(longest, e - s);
  }
  EXPECT_EQ(max_len, longest);
  for (int64_t i = 0; i < S; ++i) {
    const auto pos = t[i][2], y = t[i][1];
    int64_t padding = T;  // the row's trailing run of position 0 without a target
    while (padding > 0 && pos[padding - 1].item<int64_t>() == 0 && y[padding - 1].item<int64_t>() == I) --padding;
    if (T - padding > 1) ++padded_rows;
    for (int64_t p = 0; p < T; ++p) {
      const int64_t flat = i * T + p;
      const auto it = std::upper_bound(starts.begin(), starts.begin() + n + 1, static_cast<int32_t>(flat)) - 1;
      const int64_t s = *it, e = *(it + 1);
      if (p >= padding) {  // the padding: one sequence from its first token to the row's end
        EXPECT_EQ(s, i * T + padding);
        EXPECT_EQ(e, (i + 1) * T);
      } else if (y[p].item<int64_t>() != I) {  // a target: its sequence is its document, whole
        const int64_t doc_start = p - pos[p].item<int64_t>();
        int64_t doc_end = p + 1;
        while (doc_end < T && pos[doc_end].item<int64_t>() != 0) ++doc_end;
        EXPECT_EQ(s, i * T + doc_start) << "row " << i << " position " << p;
        EXPECT_EQ(e, i * T + doc_end) << "row " << i << " position " << p;
      }
    }
  }
  EXPECT_GT(padded_rows, 0);  // the data exercised the merge
}

}  // namespace
}  // namespace gpt2ft
