// Fine-tuning adjustments to a loaded model: freezing parts and resizing the vocabulary.
#pragma once

#include <cstdint>
#include <string>

#include "gpt2ft/model/gpt2.h"

namespace gpt2ft {

// Stops gradients for wte/wpe (embeddings, and so a tied lm_head) and the first `blocks` blocks.
void freeze(GPT2& model, bool embeddings, int64_t blocks);

// Whether freeze(model, embeddings, blocks) freezes the parameter called `name` (a
// named_parameters() key); the memory planner applies the same rule without a model.
bool is_frozen(const std::string& name, bool embeddings, int64_t blocks);

// A copy of `model` with `vocab_size` token rows: existing rows are kept, new rows (and a new
// untied lm_head's rows) start at the mean of the old ones, as when a SentencePiece
// vocabulary replaces GPT-2's.
GPT2 resize_vocab(GPT2& model, int64_t vocab_size);

}  // namespace gpt2ft
