// gpt2-finetune eval: loss and perplexity of a model folder on token shards.
#include <cstdio>
#include <iostream>
#include <memory>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "gpt2ft/core/device.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/data/samples.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/data/shard_manifest.h"
#include "gpt2ft/eval/evaluate.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/model/lora.h"
#include "gpt2ft/train/objective.h"
#include "gpt2ft/train/preference_reference.h"

namespace gpt2ft::cli {

namespace {

// Preference shards: DPO's loss and TRL's metrics of the model against a reference, as a DPO
// run's validation reports them (train/preference_reference.h's preference_sums).
template <class Args>
int evaluate_pairs(const Args& args, GPT2& model, const std::vector<std::filesystem::path>& shards, c10::Device device) {
  std::unique_ptr<PreferenceReference> reference;
  if (!args.reference.empty()) {
    reference = model_reference(load_model_folder(args.reference, device), /*chunked=*/true);
  } else if (!args.adapter.empty()) {
    reference = base_reference(/*chunked=*/true);  // the model without its adapter, as PEFT's disable_adapter()
  } else {
    throw Error("--data: " + args.data + " holds preference pairs; their DPO loss is against a reference: give "
                "--reference BASE_MODEL_FOLDER (the model the DPO run started from), or --adapter for a LoRA run "
                "(the base alone is then the reference)");
  }
  const auto pairs = pair_samples(shards, args.options.seq_len, args.options.too_long, model->config().vocab_size, "--data");
  const Samples& samples = *pairs;
  const int64_t n = args.options.max_sequences > 0 ? std::min(samples.size(), args.options.max_sequences) : samples.size();
  std::vector<int64_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[static_cast<size_t>(i)] = i;
  model->eval();
  int64_t per_pass = args.options.batch_size;
  const torch::Tensor sums = preference_sums(model, *reference, samples, ids, per_pass, args.dpo, /*chunked=*/true,
                                             args.options.amp_dtype, device, /*validation=*/false)
                                 .cpu();  // (8)
  const std::vector<std::string> names = preference_metric_names();
  nlohmann::json out = {{"dpo_loss", sums[0].item<double>() / static_cast<double>(n)},
                        {"pairs", n},
                        {"target_tokens", static_cast<int64_t>(sums[7].item<double>())}};
  for (size_t i = 0; i + 1 < names.size(); ++i) out[names[i]] = sums[static_cast<int64_t>(i) + 1].item<double>() / n;
  if (args.json) {
    std::cout << out.dump() << std::endl;
  } else {
    std::printf("DPO loss %.6f over %lld pairs (%s, beta %g): reward accuracy %.4f, margin %.4f (chosen %.4f, "
                "rejected %.4f); log-probs chosen %.3f, rejected %.3f\n",
                out["dpo_loss"].get<double>(), static_cast<long long>(n), args.dpo.loss.c_str(), args.dpo.beta,
                out["rewards/accuracies"].get<double>(), out["rewards/margins"].get<double>(),
                out["rewards/chosen"].get<double>(), out["rewards/rejected"].get<double>(),
                out["logps/chosen"].get<double>(), out["logps/rejected"].get<double>());
  }
  return kExitOk;
}

}  // namespace

void add_eval_command(CLI::App& app, Runner& run) {
  struct Args {
    std::string model, adapter, data, device = "auto", reference;
    EvalOptions options;
    PreferenceLossOptions dpo;
    bool json = false;
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand("eval", "Mean next-token loss and perplexity of a model on token shards");
  cmd->add_option("--model", args->model, "Hugging Face model folder")->required();
  cmd->add_option("--adapter", args->adapter, "A LoRA adapter folder (PEFT's format) to put on the model");
  cmd->add_option("--data", args->data, "Glob of token shards, e.g. 'data/val_*.bin'")->required();
  args->options.seq_len = 0;  // the model's n_positions unless given
  cmd->add_option("--seq-len", args->options.seq_len, "Tokens predicted per window (T); default: the model's n_positions")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  cmd->add_option("--batch-size", args->options.batch_size, "Windows per forward pass")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{65536}));
  cmd->add_option("--max-sequences", args->options.max_sequences, "Evaluate the first N windows only (0 = all)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--packing", args->options.packing,
                  "Document shards: \"documents\" (each document whole, attending only to itself, as training "
                  "packs them) or \"concat\"; auto = documents for document shards")
      ->check(CLI::IsMember({"auto", "documents", "concat"}))
      ->capture_default_str();
  cmd->add_option("--too-long", args->options.too_long, "A document longer than --seq-len + 1 tokens: truncate | error")
      ->check(CLI::IsMember({"truncate", "error"}))
      ->capture_default_str();
  cmd->add_option("--device", args->device, "auto | cpu | cuda | cuda:N")->capture_default_str();
  cmd->add_option("--reference", args->reference,
                  "Preference shards: the DPO reference model folder (default with --adapter: the model without it)");
  cmd->add_option("--beta", args->dpo.beta, "Preference shards: DPO's beta")->capture_default_str()
      ->check(CLI::Range(1e-6, 1e6));
  cmd->add_option("--loss", args->dpo.loss, "Preference shards: sigmoid | ipo | hinge")
      ->check(CLI::IsMember({"sigmoid", "ipo", "hinge"}))
      ->capture_default_str();
  cmd->add_option("--label-smoothing", args->dpo.label_smoothing, "Preference shards: sigmoid's label smoothing")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 0.5));
  cmd->add_flag("--json", args->json, "Print one JSON object as the last line");
  cmd->callback([args, &run] {
    run = [args] {
      const auto shards = expand_glob(args->data, "--data");
      check_shards_match_model(shards, args->model, "--data");
      const c10::Device device = open_device(args->device);
      GPT2 model = load_model_folder(args->model, device);
      if (!args->adapter.empty()) attach_adapter_folder(model, args->adapter);
      if (args->options.seq_len == 0) args->options.seq_len = model->config().n_positions;
      if (const auto chat = shard_chat(shards); chat && chat->vocab_size() > model->config().vocab_size) {
        throw Error("--data: the shards' chat template (" + chat->template_name + ") added the tokens " +
                    nlohmann::json(chat->added_tokens).dump() + " after the vocabulary, which " + args->model +
                    " (" + std::to_string(model->config().vocab_size) + " rows) does not have; evaluate the model "
                    "trained on them (its final/ folder, or the base with --adapter)");
      }
      if (shards_hold_pairs(args->data)) return evaluate_pairs(*args, model, shards, device);
      const EvalResult r = evaluate(model, shards, args->options, device);
      if (args->json) {
        std::cout << nlohmann::json{{"loss", r.loss},
                                    {"tokens", r.tokens},
                                    {"target_tokens", r.tokens},
                                    {"sequences", r.sequences},
                                    {"perplexity", r.perplexity}}
                         .dump()
                  << std::endl;
      } else {
        std::printf("loss %.6f over %lld target tokens (%lld sequences, %lld batches), perplexity %.4f\n", r.loss,
                    static_cast<long long>(r.tokens), static_cast<long long>(r.sequences),
                    static_cast<long long>(r.batches), r.perplexity);
      }
      return kExitOk;
    };
  });
}

}  // namespace gpt2ft::cli
