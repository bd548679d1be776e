"""How the cross-tokenizer teacher cache's tail treatment changes the loss (issue 19): google/gemma-3-270m (262,144
tokens) and a SmolLM2 student (SmolLM2-135M-Instruct with `--student_layers` of its 30 layers, 49,152 tokens) on
`--rows` BBC News training articles cut to `--max_length` student tokens, temperature 1. Both models run once; the
teacher's cached fields are made from its full logits exactly as the cache pass makes them (without the float16
rounding of the file), for each `k` in `--top_k`.

Reported per k, as the relative difference of the summed loss over all spans from the live (full-logit) loss:

  uld_spread        uld_loss against the dense span vectors with the tail spread evenly (cached_span_log_probs)
  uld_bucket        cached_uld_loss, the tail masses compared as one bucket (no far split)
  uld_bucket_far    cached_uld_loss with the far split at the student's vocabulary size (what DistillTrainer uses)
  hybrid_spread     hybrid_loss against the spread span vectors (what DistillTrainer uses)

Run (writes <out>/cross_tokenizer_tail.json):

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. python scripts/benchmarks/cross_tokenizer_tail.py
"""

import argparse
import json
import math
from pathlib import Path

import torch
from _common import SMOLLM2

ROOT = Path(__file__).resolve().parents[2]
GEMMA3 = "google/gemma-3-270m"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--student_layers", type=int, default=26)
    parser.add_argument("--top_k", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    return parser.parse_args()


def main():
    opts = parse_args()
    torch.set_num_threads(opts.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.cross_tokenizer import CrossTokenizerCollator, shared_vocabulary_map, tokenize_cross_tokenizer_example
    from hf_kd.lm_data import LMDataCollator, lm_text_dataset
    from hf_kd.losses import (
        cached_span_log_probs,
        cached_span_top_k,
        cached_uld_loss,
        hybrid_loss,
        span_log_probs,
        uld_loss,
    )
    from hf_kd.offline_models import install_offline_models
    from hf_kd.student import make_student

    install_offline_models([SMOLLM2, GEMMA3])
    smol, gemma = AutoTokenizer.from_pretrained(SMOLLM2), AutoTokenizer.from_pretrained(GEMMA3)
    student = make_student(AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32), opts.student_layers)
    teacher = AutoModelForCausalLM.from_pretrained(GEMMA3, dtype=torch.float32).eval()
    texts = lm_text_dataset()["train"]["text"][: opts.rows]
    rows = [tokenize_cross_tokenizer_example({"text": t}, smol, gemma, opts.max_length) for t in texts]
    batch = CrossTokenizerCollator(LMDataCollator(smol.eos_token_id), gemma.pad_token_id)(rows)
    starts, ends = batch["teacher_span_starts"], batch["teacher_span_ends"]
    with torch.no_grad():
        s_logits = student.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    student_spans = span_log_probs(s_logits, batch["input_ids"], batch["student_span_starts"],
                                   batch["student_span_ends"])
    teacher_spans = span_log_probs(t_logits, batch["teacher_input_ids"], starts, ends)
    shared = shared_vocabulary_map(smol, gemma)
    live_uld = uld_loss(student_spans, teacher_spans, reduction="sum").item()
    live_hybrid = hybrid_loss(student_spans, teacher_spans, *shared, reduction="sum").item()
    vocab, student_vocab = t_logits.shape[-1], s_logits.shape[-1]
    logp = torch.log_softmax(t_logits[:, :-1].float(), -1)
    token = logp.gather(-1, batch["teacher_input_ids"][:, 1:, None]).squeeze(-1)
    far = logp.sort(-1, descending=True).values[..., student_vocab:].logsumexp(-1)
    result = {"options": vars(opts), "spans": len(student_spans), "live": {"uld": live_uld, "hybrid": live_hybrid},
              "relative_to_live": {}}
    for k in opts.top_k:
        values, top = logp.topk(k, -1)
        tail = logp.scatter(-1, top, -math.inf).logsumexp(-1)
        fields = (top, values, tail, token)
        spread = cached_span_log_probs(*fields, starts, ends, vocab)
        _, top_span, tail_span, far_span = cached_span_top_k(*fields, starts, ends, far)
        figures = {
            "uld_spread": uld_loss(student_spans, spread, reduction="sum").item() / live_uld - 1,
            "uld_bucket": cached_uld_loss(student_spans, top_span, tail_span, reduction="sum").item() / live_uld - 1,
            "uld_bucket_far": cached_uld_loss(student_spans, top_span, tail_span, far_span,
                                              reduction="sum").item() / live_uld - 1,
            "hybrid_spread": hybrid_loss(student_spans, spread, *shared, reduction="sum").item() / live_hybrid - 1,
            "mean_teacher_tail_mass": tail_span.exp().mean().item(),
        }
        result["relative_to_live"][k] = {name: round(value, 5) for name, value in figures.items()}
        print(k, result["relative_to_live"][k], flush=True)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cross_tokenizer_tail.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
