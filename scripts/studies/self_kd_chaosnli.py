"""Study 2 of issue 6: self-KD from lower layers (Park et al., 2024, https://huggingface.co/papers/2406.09719) on
NLI, evaluated against ChaosNLI's 100 human labels per item.

The full SNLI / MultiNLI training sets are not available here (../shared/data/README.md), so the study cross-fits
over the NLI items that are:

- ChaosNLI-S (1,514 SNLI dev items) and ChaosNLI-M (1,599 MNLI dev-matched items), 100 labels each plus the 5
  original annotator labels (`old_labels`) and the original gold label (`old_label`);
- the 2,527 gold-labelled rows of the two SNLI dev subsets, 5 annotator labels each.

Overlaps removed (data README): the 381 SNLI-subset rows that are ChaosNLI-S items (same pairID) are kept once, as
ChaosNLI items; SNLI rows whose (premise, hypothesis) text equals a ChaosNLI item's are dropped too (counted in the
output). ChaosNLI-S and -M are each split into `--folds` folds at random (`--data_seed`). For fold k:

- evaluation: the ChaosNLI items of fold k, against their 100-label distributions and majority labels;
- training pool: the ChaosNLI items of the other folds, with their single ORIGINAL gold label (`old_label`, what an
  SNLI/MNLI-trained model sees), and the SNLI-only rows with their gold label;
- validation: `--validation_rows` rows of that pool, with their 5-annotator distributions (the paper validates on
  SNLI/MNLI dev items with 5 labels); training: `--train_rows` of the remaining rows (single labels only).

Every ChaosNLI item is evaluated exactly once per seed, by a model that never saw it; metrics are computed on the
union of the folds, for ChaosNLI-S and ChaosNLI-M separately (as in the ChaosNLI paper's table). Methods: see
scripts/studies/_common.py. Results: outputs/self_kd_chaosnli/results.jsonl (+ logits/*.npy; resumable) and
docs/benchmarks/self_kd_chaosnli.{md,json}.

    PYTHONPATH=. python scripts/studies/self_kd_chaosnli.py --folds 2 --train_rows 800 --epochs 4 --seeds 0 1 2
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
from _common import (
    BACKBONE,
    VARIANTS,
    acceptance,
    append_result,
    budget_of,
    compute_line,
    distribution_metrics,
    markdown_table,
    read_results,
    run_method,
    study_parser,
    summary_rows,
    tokenizer,
)

SUBSETS = ("chaos_s", "chaos_m")
# ChaosNLI README (PAPERS.md section 1.4): the ChaosNLI paper's BERT-base, trained on the full SNLI + MNLI training
# sets (Nie et al., 2020). Quoted for scale only: a different training set, a different backbone.
BERT_BASE = {
    "chaos_s": {"name": "ChaosNLI paper: BERT-base (full SNLI+MNLI train)", "js_distance": 0.2345, "kl": 0.4810,
                "accuracy": 0.7292},
    "chaos_m": {"name": "ChaosNLI paper: BERT-base (full SNLI+MNLI train)", "js_distance": 0.3055, "kl": 0.7204,
                "accuracy": 0.5591},
}


def _distribution(labels, names):
    counts = Counter(labels)
    return [counts[name] / len(labels) for name in names]


def build_items(data_dir: str) -> tuple[list[dict], dict]:
    """All items with: source, premise, hypothesis, gold (single label index), human5 (5-annotator distribution),
    and for ChaosNLI items human100 and majority100."""
    from hf_kd.data import NLI_LABELS, load_chaosnli, load_snli_dev_subsets

    items, stats = [], {}
    chaos_uids, chaos_pairs = set(), set()
    for subset, name in (("snli", "chaos_s"), ("mnli", "chaos_m")):
        data = load_chaosnli(data_dir, subset)
        for row in data:
            items.append({
                "source": name, "uid": row["uid"], "premise": row["premise"], "hypothesis": row["hypothesis"],
                "gold": NLI_LABELS.index(row["old_label"]), "human5": _distribution(row["old_labels"], NLI_LABELS),
                "human100": row["human_label_dist"], "majority100": row["label"],
            })
            chaos_uids.add(row["uid"])
            chaos_pairs.add((row["premise"], row["hypothesis"]))
        stats[name] = len(data)
    snli = load_snli_dev_subsets(data_dir)
    same_uid = same_text = 0
    for row in snli:
        if row["pairID"] in chaos_uids:
            same_uid += 1
            continue
        if (row["premise"], row["hypothesis"]) in chaos_pairs:
            same_text += 1
            continue
        items.append({"source": "snli_rows", "uid": row["pairID"], "premise": row["premise"],
                      "hypothesis": row["hypothesis"], "gold": row["label"], "human5": row["human_label_dist"]})
    stats.update(snli_rows_gold=len(snli), removed_same_pair_id=same_uid, removed_same_text=same_text,
                 snli_rows_kept=len(snli) - same_uid - same_text)
    return items, stats


def fold_splits(items: list[dict], folds: int, validation_rows: int, train_rows: int, seed: int,
                max_eval_items: int | None = None):
    """Per fold: (train, validation, {subset: evaluation}) lists of items (at most `max_eval_items` per subset, for
    smoke runs: the metrics then cover part of ChaosNLI only)."""
    rng = np.random.default_rng(seed)
    fold_of = {}
    for subset in SUBSETS:
        indices = [i for i, item in enumerate(items) if item["source"] == subset]
        for position, i in enumerate(rng.permutation(indices)):
            fold_of[int(i)] = position % folds
    splits = []
    for k in range(folds):
        evaluation = {s: [items[i] for i in sorted(fold_of) if fold_of[i] == k and items[i]["source"] == s]
                      [:max_eval_items] for s in SUBSETS}
        pool = [item for i, item in enumerate(items) if fold_of.get(i, -1) != k]
        order = rng.permutation(len(pool))
        validation = [pool[i] for i in order[:validation_rows]]
        train = [pool[i] for i in order[validation_rows:validation_rows + train_rows]]
        splits.append((train, validation, evaluation))
    return splits


def to_dataset(items, label_key, human_key, max_length):
    import datasets

    from hf_kd.data import NLI_LABELS, tokenize_dataset

    columns = {"premise": [i["premise"] for i in items], "hypothesis": [i["hypothesis"] for i in items],
               "label": [i[label_key] for i in items]}
    features = {"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=NLI_LABELS)}
    if human_key is not None:
        columns["human_label_dist"] = [i[human_key] for i in items]
        features["human_label_dist"] = datasets.List(datasets.Value("float32"))
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    dataset = tokenize_dataset(dataset, tokenizer(), "premise", "hypothesis", max_length=max_length)
    return dataset.remove_columns(["premise", "hypothesis"])


def main():
    parser = study_parser(__doc__, "self_kd_chaosnli", max_length=128, train_rows=800)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--validation_rows", type=int, default=400)
    parser.add_argument("--max_eval_items", type=int, default=None, help="per subset and fold; smoke runs only")
    opts = parser.parse_args()
    budget = budget_of(opts)
    work = Path(opts.work_dir)
    results_path = work / "results.jsonl"
    settings = {**budget, **{k: getattr(opts, k) for k in ("folds", "train_rows", "validation_rows", "max_length",
                                                           "data_seed", "max_eval_items")}, "backbone": BACKBONE}

    items, stats = build_items(opts.data_dir)
    splits = fold_splits(items, opts.folds, opts.validation_rows, opts.train_rows, opts.data_seed,
                         opts.max_eval_items)
    print(json.dumps(stats), flush=True)
    if not opts.summary_only:
        done = {(r["method"], r["seed"], r["fold"]) for r in read_results(results_path) if r["settings"] == settings}
        for fold, (train_items, validation_items, evaluation) in enumerate(splits):
            train = to_dataset(train_items, "gold", None, opts.max_length)
            validation = to_dataset(validation_items, "gold", "human5", opts.max_length)
            tests = {s: to_dataset(evaluation[s], "majority100", "human100", opts.max_length) for s in SUBSETS}
            human = {"validation": np.asarray(validation["human_label_dist"]),
                     **{s: np.asarray(tests[s]["human_label_dist"]) for s in SUBSETS}}
            majority = {"validation": np.asarray(validation["label"]), **{s: np.asarray(tests[s]["label"]) for s in SUBSETS}}
            for seed in opts.seeds:
                for method in [m for m in opts.methods if m != "ts" and (m, seed, fold) not in done]:
                    with_ts = "ts" in opts.methods and ("ts", seed, fold) not in done
                    for record in run_method(method, seed, train, validation, tests, human, majority, budget,
                                             work / f"fold{fold}", with_ts):
                        save_logits(work, record["method"], seed, fold, record.pop("logits"))
                        append_result(results_path, {**record, "fold": fold, "settings": settings})
    write_summary(read_results(results_path), settings, splits, stats, opts)


def save_logits(work: Path, method: str, seed: int, fold: int, logits: dict) -> None:
    folder = work / "logits"
    folder.mkdir(parents=True, exist_ok=True)
    for split, values in logits.items():
        np.save(folder / f"{method}_seed{seed}_fold{fold}_{split}.npy", values)


def write_summary(records, settings, splits, stats, opts):
    """Metrics on the union of the folds per (method, seed), then mean and std over seeds."""
    records = [r for r in records if r["settings"] == settings]
    work = Path(opts.work_dir)
    methods = [m for m in ["erm", "ls", "ts", *VARIANTS] if any(r["method"] == m for r in records)]
    union = []
    for method in methods:
        for seed in sorted({r["seed"] for r in records if r["method"] == method}):
            folds = {r["fold"] for r in records if r["method"] == method and r["seed"] == seed}
            if folds != set(range(settings["folds"])):
                continue  # a seed with missing folds would evaluate only part of ChaosNLI
            metrics = {}
            for subset in SUBSETS:
                logits = np.concatenate([np.load(work / "logits" / f"{method}_seed{seed}_fold{k}_{subset}.npy")
                                         for k in range(settings["folds"])])
                human = np.concatenate([[i["human100"] for i in splits[k][2][subset]] for k in range(settings["folds"])])
                majority = np.concatenate([[i["majority100"] for i in splits[k][2][subset]]
                                           for k in range(settings["folds"])])
                metrics[subset] = distribution_metrics(logits, human, majority)
            union.append({"method": method, "seed": seed, "metrics": metrics})
    sizes = {k: len(splits[0][v]) for k, v in (("train", 0), ("validation", 1))}
    lines = [
        "# Self-KD from lower layers on NLI, against ChaosNLI's 100 labels per item (cross-fitted)",
        "",
        f"Backbone {BACKBONE}; {settings['folds']}-fold cross-fitting over ChaosNLI-S ({stats['chaos_s']}) and "
        f"-M ({stats['chaos_m']}) plus {stats['snli_rows_kept']} SNLI-only dev rows ({stats['removed_same_pair_id']} "
        f"SNLI rows that are ChaosNLI-S items and {stats['removed_same_text']} with a ChaosNLI item's text removed); "
        f"per fold {sizes['train']} training rows (single gold labels) and {sizes['validation']} validation rows "
        f"(5-annotator distributions), data seed {settings['data_seed']}; max_length {settings['max_length']}, "
        f"{settings['epochs']} epochs, lr {settings['learning_rate']}, batch {settings['batch_size']}; LS epsilon "
        f"{settings['ls_epsilon']}; SelfKD warm-up cap {settings['warmup_max_epochs']}, E = "
        f"{settings['stable_epochs']}. Every ChaosNLI item is scored once per seed by a model that never saw it. "
        "Mean ± std over seeds. " + compute_line(records),
        "",
    ]
    all_rows = {}
    for subset, title in (("chaos_s", "ChaosNLI-S (SNLI items)"), ("chaos_m", "ChaosNLI-M (MNLI items)")):
        title += f", {sum(len(split[2][subset]) for split in splits)} items evaluated"
        rows = summary_rows(union, subset, methods)
        all_rows[subset] = rows
        lines += [f"## {title}", "", markdown_table(rows, BERT_BASE[subset]), "", "Acceptance (issue 6):", "",
                  *[f"- {line}" for line in acceptance(rows)], ""]
    lines.append("Source layers selected (SelfKD runs): " + ", ".join(
        f"{r['method']} seed {r['seed']} fold {r['fold']}: layer {r['info']['source_layer']} after "
        f"{r['info']['warmup_epochs']} warm-up epochs" for r in records if r["info"].get("source_layer")))
    lines.append("")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "self_kd_chaosnli.md").write_text("\n".join(lines))
    (out / "self_kd_chaosnli.json").write_text(json.dumps(
        {"settings": settings, "data": stats, "summary": all_rows, "union_runs": union, "runs": records}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
