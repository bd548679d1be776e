"""Study 1 of issue 6: self-KD from lower layers (Park et al., 2024, https://huggingface.co/papers/2406.09719) on
LeWiDi 2023 MD-Agreement (offensiveness of tweets, 5 annotators per item), against human label distributions.

Protocol: train on the train split's majority labels only (`hard_label`; the annotator distributions of the train
split are dropped), `--train_rows` rows drawn once with `--data_seed` (the same rows for every method and seed);
validate on the whole dev split's annotator distributions (SelfKD's source-layer selection, the temperature of
`ts`); evaluate on the whole test split's (3,055 tweets): KL(human || model), JS distance (ChaosNLI's conventions),
accuracy against the majority label. Methods: see scripts/studies/_common.py. Backbone all-MiniLM-L6-v2,
`--max_length` tokens, `--epochs` epochs for every method.

Results: outputs/self_kd_md_agreement/results.jsonl (one line per run, resumable) and
docs/benchmarks/self_kd_md_agreement.{md,json}.

    PYTHONPATH=. python scripts/studies/self_kd_md_agreement.py --train_rows 1000 --epochs 4 --seeds 0 1 2
"""

import json
from pathlib import Path

import numpy as np
from _common import (
    BACKBONE,
    VARIANTS,
    acceptance,
    append_result,
    budget_of,
    compute_line,
    markdown_table,
    read_results,
    run_method,
    study_parser,
    summary_rows,
    tokenizer,
)


def load(opts):
    from hf_kd.data import load_lewidi, tokenize_dataset

    train = load_lewidi(opts.data_dir, "MD-Agreement", "train").remove_columns("human_label_dist")
    if opts.train_rows < len(train):
        train = train.shuffle(seed=opts.data_seed).select(range(opts.train_rows))
    dev = load_lewidi(opts.data_dir, "MD-Agreement", "dev")
    test = load_lewidi(opts.data_dir, "MD-Agreement", "test")
    tok = tokenizer()
    keep = ["input_ids", "attention_mask", "token_type_ids", "label", "human_label_dist"]

    def prepare(dataset):
        dataset = tokenize_dataset(dataset, tok, max_length=opts.max_length)
        return dataset.remove_columns([c for c in dataset.column_names if c not in keep])

    return prepare(train), prepare(dev), prepare(test)


def main():
    parser = study_parser(__doc__, "self_kd_md_agreement", max_length=64, train_rows=1000)
    opts = parser.parse_args()
    budget = budget_of(opts)
    work = Path(opts.work_dir)
    results_path = work / "results.jsonl"
    settings = {**budget, "train_rows": opts.train_rows, "max_length": opts.max_length, "data_seed": opts.data_seed,
                "backbone": BACKBONE}

    if not opts.summary_only:
        train, dev, test = load(opts)
        human = {"validation": np.asarray(dev["human_label_dist"]), "test": np.asarray(test["human_label_dist"])}
        majority = {"validation": np.asarray(dev["label"]), "test": np.asarray(test["label"])}
        done = {(r["method"], r["seed"]) for r in read_results(results_path) if r["settings"] == settings}
        for seed in opts.seeds:
            for method in [m for m in opts.methods if m != "ts" and (m, seed) not in done]:
                with_ts = "ts" in opts.methods and ("ts", seed) not in done
                for record in run_method(method, seed, train, dev, {"test": test}, human, majority, budget, work,
                                         with_ts):
                    record.pop("logits")
                    append_result(results_path, {**record, "settings": settings})
    write_summary(read_results(results_path), settings, opts)


def write_summary(records, settings, opts):
    records = [r for r in records if r["settings"] == settings]
    methods = [m for m in ["erm", "ls", "ts", *VARIANTS] if any(r["method"] == m for r in records)]
    rows = summary_rows(records, "test", methods)
    lines = [
        "# Self-KD from lower layers on LeWiDi 2023 MD-Agreement (test split, 3,055 tweets, 5 annotators each)",
        "",
        f"Backbone {BACKBONE}; trained on {settings['train_rows']} train rows (majority labels only, data seed "
        f"{settings['data_seed']}), max_length {settings['max_length']}, {settings['epochs']} epochs, lr "
        f"{settings['learning_rate']}, batch {settings['batch_size']}; LS epsilon {settings['ls_epsilon']}; SelfKD "
        f"warm-up cap {settings['warmup_max_epochs']} epochs, E = {settings['stable_epochs']}. Mean ± std over seeds. "
        + compute_line(records),
        "",
        markdown_table(rows),
        "",
        "Acceptance (issue 6):",
        "",
        *[f"- {line}" for line in acceptance(rows)],
        "",
        "Source layers selected (SelfKD runs): "
        + ", ".join(f"{r['method']} seed {r['seed']}: layer {r['info']['source_layer']} after "
                    f"{r['info']['warmup_epochs']} warm-up epochs" for r in records if r["info"].get("source_layer")),
        "",
    ]
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "self_kd_md_agreement.md").write_text("\n".join(lines))
    (out / "self_kd_md_agreement.json").write_text(json.dumps({"settings": settings, "summary": rows,
                                                               "runs": records}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
