"""Early-exit LLM generation speed: plain greedy vs LayerSkip self-speculative decoding vs transformers'
`assistant_early_exit` (CPU).

SmolLM2-135M-Instruct as a [`hf_kd.MultiExitForCausalLM`] with one **untrained** exit after `--exit-layer` (the
backbone's final norm + LM head, no adapter), float32, chat prompts left-padded:

- batch 1 (each of the first `--batch1-prompts` prompts alone): `model.generate(do_sample=False)` (the backbone's
  greedy), `model.generate(early_exit="self_speculative", exit_layer=E, num_draft_tokens=k)` (hf_kd: verification
  starts at layer E from the draft's hidden states and KV cache), and the backbone's
  `generate(assistant_early_exit=E)` (transformers' LayerSkip-style self-speculation);
- batch `--batch-size` (all prompts at once): plain greedy vs hf_kd self-speculative (transformers' assisted
  generation takes batch 1 only).

With `--confident-exits`, also CALM-style `generate(early_exit="confident")` with those untrained exits, one point of
a curve per `--epsilon` value: thresholds fitted by `model.fit_exit_thresholds` (Learn-then-Test at that epsilon and
`--delta`) on `--calibration-rows` BBC News validation articles (128 tokens each), then batch-1 generation next to
greedy: tokens/s, layers per token, where each token left, whether the text stays greedy's (it need not: confident
decoding is not lossless), and, from one teacher-forced pass of the full model over each generated text, the share of
new tokens that differ from the full model's greedy choice after the same prefix and the text's perplexity under the
full model (greedy's own text as the reference).

Each figure is new tokens per second (tokens up to each row's EOS, or `--max-new-tokens`), the median of `--repeats`
interleaved runs after one warm-up; every method's token ids are checked against plain greedy's. The exits are
untrained, so drafts are mostly rejected: expect slow-downs, not speed-ups (the acceptance rate is printed).

Run (prints a markdown table and writes --json; docs/benchmarks/early_exit_lm_generation.md records one run):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. \\
        python scripts/benchmarks/early_exit_lm_generation.py --json docs/benchmarks/early_exit_lm_generation.json
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. \\
        python scripts/benchmarks/early_exit_lm_generation.py --confident-exits 8 15 26 --skip-speculative \\
        --epsilon 0.02 0.05 0.1 0.2 0.3 --batch1-prompts 4 --repeats 2 --json docs/benchmarks/early_exit_lm_confident.json
"""

import argparse
import json
import math
import platform
import statistics
import time

import torch
from transformers import AutoTokenizer

from hf_kd import MultiExitForCausalLM
from hf_kd.lm_data import lm_text_dataset
from hf_kd.offline_models import install_offline_models

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works.",
    "What are the main causes of the French Revolution?",
    "Give me three tips for learning a new language.",
    "Describe the water cycle in simple words.",
    "Why is the sky blue?",
    "Write a poem about the sea.",
    "How does a computer store numbers?",
]


def new_tokens(sequences: torch.Tensor, prompt_len: int, eos: int) -> int:
    """Generated tokens up to and including each row's first EOS (the pad tokens after it are not work)."""
    count = 0
    for row in sequences[:, prompt_len:].tolist():
        count += row.index(eos) + 1 if eos in row else len(row)
    return count


def timed(methods: dict, inputs, repeats: int) -> tuple[dict, dict]:
    """Each method's last output and median seconds over `repeats` interleaved runs after one warm-up round."""
    times, outputs = {method: [] for method in methods}, {}
    with torch.no_grad():
        for repeat in range(repeats + 1):  # the first round warms up and is not timed
            for method, generate in methods.items():
                start = time.perf_counter()
                outputs[method] = generate(inputs)
                if repeat:
                    times[method].append(time.perf_counter() - start)
    return outputs, {method: statistics.median(t) for method, t in times.items()}


def speculative_section(args, tokenizer, chats: list[str]) -> list[dict]:
    """Greedy vs hf_kd self-speculative vs transformers' assistant_early_exit, batch 1 and batch `--batch-size`."""
    model = MultiExitForCausalLM.from_backbone(SMOLLM2, exit_layers=[args.exit_layer]).eval()
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    greedy = dict(do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    speculative = dict(early_exit="self_speculative", exit_layer=args.exit_layer,
                       num_draft_tokens=args.num_draft_tokens, max_new_tokens=args.max_new_tokens,
                       pad_token_id=tokenizer.pad_token_id)
    methods = {
        "greedy": lambda inputs: model.generate(**inputs, **greedy),
        "hf_kd self_speculative": lambda inputs: model.generate(**inputs, **speculative),
        "transformers assistant_early_exit": lambda inputs: model.backbone.generate(
            **inputs, assistant_early_exit=args.exit_layer, **greedy
        ),
    }
    settings = [(f"batch 1, prompt {i}", [chats[i]], list(methods)) for i in range(args.batch1_prompts)]
    settings.append((f"batch {args.batch_size}", chats[: args.batch_size], list(methods)[:2]))
    results = []
    for name, texts, names in settings:
        inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        prompt_len = inputs["input_ids"].shape[1]
        outputs, seconds = timed({method: methods[method] for method in names}, inputs, args.repeats)
        reference = outputs["greedy"]
        tokens = new_tokens(reference, prompt_len, eos)
        for method in names:
            out = outputs[method]
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            row = {
                "setting": name,
                "method": method,
                "new_tokens": tokens,
                "seconds": seconds[method],
                "tokens_per_s": tokens / seconds[method],
                "identical_to_greedy": torch.equal(sequences, reference),
            }
            if method == "hf_kd self_speculative":
                steps = out.accepted_per_step
                row["verify_passes"] = out.num_verify_passes
                row["mean_accepted_drafts"] = float(steps[steps >= 0].float().mean())
                row["layers_run_per_row"] = out.layers_run
                row["greedy_layers_per_row"] = model.config.exit_layers[-1] * (sequences.shape[1] - prompt_len - 1)
            results.append(row)
            print(json.dumps(row))

    print()
    print(f"| setting | method | new tokens | s (median of {args.repeats}) | tokens/s | identical to greedy | "
          "drafts accepted per row and pass (of k) | layer evaluations per row (greedy's) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        accepted = f"{row['mean_accepted_drafts']:.2f} of {args.num_draft_tokens}" if "verify_passes" in row else ""
        layers = f"{row['layers_run_per_row']} ({row['greedy_layers_per_row']})" if "verify_passes" in row else ""
        print(f"| {row['setting']} | {row['method']} | {row['new_tokens']} | {row['seconds']:.2f} | "
              f"{row['tokens_per_s']:.1f} | {row['identical_to_greedy']} | {accepted} | {layers} |")
    return results


def full_model_scores(model, sequences: torch.Tensor, prompt_len: int, eos: int) -> dict:
    """The full model (the backbone, every layer) teacher-forced on one generated row `(1, len)`: over the new tokens
    up to the first EOS, how many differ from the full model's greedy choice after the same prefix, and their summed
    negative log-likelihood under the full model (for the perplexity of the generated text)."""
    tokens = new_tokens(sequences, prompt_len, eos)
    with torch.no_grad():
        logits = model.backbone(input_ids=sequences[:, : prompt_len + tokens]).logits[0, prompt_len - 1 : -1].float()
    generated = sequences[0, prompt_len : prompt_len + tokens]
    nll = torch.nn.functional.cross_entropy(logits, generated, reduction="sum")
    return {"tokens": tokens, "disagreements": int((logits.argmax(-1) != generated).sum()), "nll": float(nll)}


def confident_section(args, tokenizer, chats: list[str]) -> dict:
    """Confident decoding against greedy, one point per `--epsilon`: Learn-then-Test thresholds for
    `--confident-exits` fitted on BBC News text, then batch-1 generation of the first `--batch1-prompts` prompts;
    tokens/s, layers per token, disagreement with the full model and perplexity of the text under it."""
    model = MultiExitForCausalLM.from_backbone(SMOLLM2, exit_layers=args.confident_exits).eval()
    articles = lm_text_dataset()["validation"]["text"][: args.calibration_rows]
    calibration = tokenizer(articles, truncation=True, max_length=128, padding=True, return_tensors="pt")
    eos, depth = tokenizer.eos_token_id, model.config.exit_layers[-1]
    greedy = dict(do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    points = []
    for epsilon in args.epsilon:
        start = time.perf_counter()
        fit = model.fit_exit_thresholds(calibration["input_ids"], epsilon=epsilon, delta=args.delta,
                                        attention_mask=calibration["attention_mask"], batch_size=4)
        fit_seconds = time.perf_counter() - start
        print(f"epsilon {epsilon}: fit ({fit.num_tokens} tokens, {fit_seconds:.1f} s): thresholds {fit.thresholds}, "
              f"calibration disagreement {fit.disagreement}", flush=True)
        methods = {
            "greedy": lambda inputs: model.generate(**inputs, **greedy),
            "hf_kd confident": lambda inputs: model.generate(**inputs, early_exit="confident",
                                                             max_new_tokens=args.max_new_tokens,
                                                             pad_token_id=tokenizer.pad_token_id),
        }
        rows = []
        for i in range(args.batch1_prompts):
            inputs = tokenizer([chats[i]], return_tensors="pt")
            prompt_len = inputs["input_ids"].shape[1]
            outputs, seconds = timed(methods, inputs, args.repeats)
            reference, out = outputs["greedy"], outputs["hf_kd confident"]
            generated, exits = out.sequences[0, prompt_len:], out.exit_layers[0].tolist()
            same = (generated[: reference.shape[1] - prompt_len] == reference[0, prompt_len : prompt_len + len(generated)])
            rows.append({
                "prompt": i,
                "greedy_seconds": seconds["greedy"], "confident_seconds": seconds["hf_kd confident"],
                "greedy_tokens_per_s": new_tokens(reference, prompt_len, eos) / seconds["greedy"],
                "confident_tokens_per_s": new_tokens(out.sequences, prompt_len, eos) / seconds["hf_kd confident"],
                "identical_to_greedy": torch.equal(out.sequences, reference),
                "tokens_before_first_difference": int(same.long().cumprod(0).sum()),
                "exit_layer_counts": {layer: exits.count(layer) for layer in sorted(set(exits))},
                "layers_run": out.layers_run, "greedy_layers": depth * (new_tokens(reference, prompt_len, eos) - 1),
                "confident_full_model": full_model_scores(model, out.sequences, prompt_len, eos),
                "greedy_full_model": full_model_scores(model, reference, prompt_len, eos),
            })
            print(json.dumps(rows[-1]), flush=True)
        points.append({"epsilon": epsilon, "thresholds": fit.thresholds, "disagreement": fit.disagreement,
                       "num_tokens": fit.num_tokens, "fit_seconds": fit_seconds, "prompts": rows,
                       "summary": curve_point(rows)})
    return {"delta": args.delta, "exits": model.config.exit_layers, "points": points}


def curve_point(rows: list[dict]) -> dict:
    """One point of the confident-decoding curve from its prompts: tokens/s of both methods (summed tokens over
    summed seconds), layers per new token, the token disagreement with the full model and the perplexity of the
    generated text under the full model, for confident decoding and for greedy (the reference)."""
    def pooled(method):
        """(tokens/s, disagreement with the full model, perplexity under it) of `method` over the prompts."""
        scores = [r[f"{method}_full_model"] for r in rows]
        tokens = sum(s["tokens"] for s in scores)
        return (tokens / sum(r[f"{method}_seconds"] for r in rows), sum(s["disagreements"] for s in scores) / tokens,
                math.exp(sum(s["nll"] for s in scores) / tokens))

    confident_speed, disagreement, perplexity = pooled("confident")
    greedy_speed, _, greedy_perplexity = pooled("greedy")
    return {
        "confident_tokens_per_s": confident_speed, "greedy_tokens_per_s": greedy_speed,
        "layers_per_token": sum(r["layers_run"] for r in rows) / sum(max(r["confident_full_model"]["tokens"] - 1, 1)
                                                                      for r in rows),
        "disagreement_with_full_model": disagreement, "perplexity_under_full_model": perplexity,
        "greedy_perplexity_under_full_model": greedy_perplexity,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exit-layer", type=int, default=8)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch1-prompts", type=int, default=2, help="prompts timed one at a time")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts timed together (at most 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--confident-exits", type=int, nargs="*", help="also time confident decoding with these exits")
    parser.add_argument("--skip-speculative", action="store_true", help="only the confident-decoding part")
    parser.add_argument("--epsilon", type=float, nargs="+", default=[0.1],
                        help="one point of the confident-decoding curve per value")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--calibration-rows", type=int, default=16)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    install_offline_models([SMOLLM2])
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    results = [] if args.skip_speculative else speculative_section(args, tokenizer, chats)
    confident = confident_section(args, tokenizer, chats) if args.confident_exits else None
    if args.json:
        meta = {
            "model": SMOLLM2, "exit_layer": args.exit_layer, "num_draft_tokens": args.num_draft_tokens,
            "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
        }
        with open(args.json, "w") as f:
            json.dump({"settings": meta, "results": results, "confident": confident}, f, indent=1)


if __name__ == "__main__":
    main()
