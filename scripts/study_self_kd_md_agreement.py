"""Study 1 of issue 6: self-KD from lower layers (Park et al., 2024, https://huggingface.co/papers/2406.09719) on
LeWiDi 2023 MD-Agreement (offensiveness of tweets, 5 annotators per item), against human label distributions.

Protocol: train on the train split's majority labels only (`hard_label`; the annotator distributions of the train
split are dropped), `--train_rows` rows drawn once with `--data_seed` (the same rows for every method and seed);
validate on the whole dev split's annotator distributions (SelfKD's source-layer selection, the temperature of
`ts`); evaluate on the whole test split's (3,055 tweets): KL(human || model), JS distance (ChaosNLI's conventions),
accuracy against the majority label. Methods: see scripts/self_kd_study_utils.py. Backbone all-MiniLM-L6-v2,
`--max_length` tokens, `--epochs` epochs for every method.

Results: outputs/self_kd_md_agreement/results.jsonl (one line per run, resumable) and
docs/benchmarks/self_kd_md_agreement.{md,json}.

    PYTHONPATH=. python scripts/study_self_kd_md_agreement.py --train_rows 2000 --epochs 4 --seeds 0 1 2
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from self_kd_study_utils import (  # noqa: E402
    BACKBONE,
    BASE_METHODS,
    ROOT,
    SHARED_DATA,
    VARIANTS,
    acceptance,
    append_result,
    compute_line,
    distribution_metrics,
    markdown_table,
    read_results,
    set_threads,
    summary_rows,
    temperature_scaled,
    tokenizer,
    train_and_predict,
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_rows", type=int, default=2000)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--warmup_max_epochs", type=int, default=2)
    parser.add_argument("--stable_epochs", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--ls_epsilon", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(BASE_METHODS),
                        help=f"erm, ls, ts (needs erm) and the SelfKD variants {list(VARIANTS)}")
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data_dir", default=str(SHARED_DATA))
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "self_kd_md_agreement"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--summary_only", action="store_true", help="only rebuild the tables from results.jsonl")
    opts = parser.parse_args()
    set_threads(opts.threads)
    work = Path(opts.work_dir)
    results_path = work / "results.jsonl"
    budget = {k: getattr(opts, k) for k in ("epochs", "learning_rate", "batch_size", "ls_epsilon",
                                            "warmup_max_epochs", "stable_epochs")}
    settings = {**budget, "train_rows": opts.train_rows, "max_length": opts.max_length, "data_seed": opts.data_seed,
                "backbone": BACKBONE}

    if not opts.summary_only:
        train, dev, test = load(opts)
        human = {"validation": np.asarray(dev["human_label_dist"]), "test": np.asarray(test["human_label_dist"])}
        majority = {"validation": np.asarray(dev["label"]), "test": np.asarray(test["label"])}
        done = {(r["method"], r["seed"]) for r in read_results(results_path) if r["settings"] == settings}
        for seed in opts.seeds:
            for method in [m for m in opts.methods if m != "ts"]:
                if (method, seed) in done:
                    continue
                run = train_and_predict(method, seed, train, dev, {"test": test}, budget, work)
                metrics = {split: distribution_metrics(logits, human[split], majority[split])
                           for split, logits in run["logits"].items()}
                record = {"method": method, "seed": seed, "settings": settings, "metrics": metrics,
                          "info": run["info"], "train_seconds": run["train_seconds"],
                          "total_seconds": run["total_seconds"], "cpu_seconds": run["cpu_seconds"]}
                append_result(results_path, record)
                print(json.dumps({k: record[k] for k in ("method", "seed", "info", "total_seconds")}),
                      json.dumps(metrics["test"]), flush=True)
                if method == "erm" and "ts" in opts.methods and ("ts", seed) not in done:
                    temperature = temperature_scaled(run["logits"]["validation"], human["validation"])
                    scaled = {split: distribution_metrics(run["logits"][split] / temperature, human[split],
                                                          majority[split]) for split in ("validation", "test")}
                    append_result(results_path, {"method": "ts", "seed": seed, "settings": settings,
                                                 "metrics": scaled, "info": {"temperature": temperature},
                                                 "train_seconds": 0.0, "total_seconds": 0.0, "cpu_seconds": 0.0})
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
