"""How well does a label-free figure rank runs? Final RankMe (and the final loss) against k-NN and 5-shot accuracy.

For each run directory: RankMe of the target backbone and head on 1024 of its own training images
(:func:`msn.eval.rankme.rankme_report`), the final loss and status (metrics.csv, status.json), k-NN-20 accuracy and
5-shot logistic regression (3 splits) on a labelled set (:func:`msn.eval.evaluate.evaluate`); then Spearman's rho
of each label-free figure against each accuracy, over all runs and over the runs that did not collapse.
docs/studies.md ("Picking a run without labels") holds the results. Usage:

    python scripts/rankme_study.py outputs/d_* --dataset digits --out study_digits.json
    python scripts/rankme_study.py outputs/f_* --dataset fashion_mnist --crop-pct 1 --train-subset 10000
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

from scipy.stats import spearmanr

from msn.eval.evaluate import evaluate
from msn.eval.rankme import rankme_report
from msn.utils.rundir import read_status


def final_row(run: Path) -> dict[str, str]:
    """The last row of the run's metrics.csv."""
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))[-1]


def measure(run: Path, dataset: str, crop_pct: float, train_subset: int | None) -> dict[str, Any]:
    """One run's figures: final loss, status, distinct prototypes, RankMe (backbone, head, and the backbone's
    centred), k-NN and 5-shot (%)."""
    last, status = final_row(run), read_status(run) or {}
    rank = rankme_report(str(run), crop_pct=crop_pct)["results"]
    knn = evaluate("knn", run, dataset=dataset, crop_pct=crop_pct, splits=1, train_subset=train_subset)
    shots = evaluate("lowshot", run, dataset=dataset, crop_pct=crop_pct, splits=3, train_subset=train_subset,
                     shots=[5], fraction=0.0)
    return {"run": run.name, "status": status.get("status", "?"), "step": int(float(last["step"])),
            "loss": float(last["loss"]), "distinct_prototypes": float(last["distinct_prototypes"]),
            "rankme": rank["backbone"]["mean"], "rankme_head": rank["head"]["mean"],
            "rankme_centred": rank["backbone_centred"]["mean"],
            "knn": knn["results"]["100%"]["mean"], "shot5": shots["results"]["5"]["mean"]}


def rho(rows: list[dict[str, Any]], a: str, b: str, sign: float = 1.0) -> float:
    """Spearman's rho of ``sign * a`` against ``b`` over ``rows`` (nan with fewer than 3)."""
    if len(rows) < 3:
        return math.nan
    return float(spearmanr([sign * r[a] for r in rows], [r[b] for r in rows]).statistic)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--collapsed-ce-below", type=float, default=0.2,
                   help="a run whose final ce is under this with 1 distinct prototype counts as collapsed")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = [measure(run, args.dataset, args.crop_pct, args.train_subset) for run in args.runs]
    print("| run | status | final loss | distinct prototypes | RankMe backbone | RankMe head | centred | k-NN (%) | "
          "5-shot (%) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["knn"]):
        print(f"| {r['run']} | {r['status']} | {r['loss']:.3f} | {r['distinct_prototypes']:.0f} | {r['rankme']:.2f} | "
              f"{r['rankme_head']:.2f} | {r['rankme_centred']:.2f} | {r['knn']:.1f} | {r['shot5']:.1f} |")
    healthy = [r for r in rows if r["distinct_prototypes"] > 1]
    table = {}
    for name, subset in (("all runs", rows), ("runs that did not collapse", healthy)):
        for figure, sign in (("rankme", 1.0), ("rankme_head", 1.0), ("rankme_centred", 1.0), ("loss", -1.0)):
            for target in ("knn", "shot5"):
                table[f"{name}: {'-' if sign < 0 else ''}{figure} vs {target}"] = rho(subset, figure, target, sign)
    print()
    for key, value in table.items():
        print(f"Spearman's rho, {key}: {value:+.2f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"runs": rows, "spearman": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
