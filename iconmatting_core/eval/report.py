"""Results out: one CSV row per image, the paper-style table."""
from __future__ import annotations

import csv
from typing import Dict

METRIC_KEYS = ("sad", "mse", "grad", "conn")

def write_csv(results, path) -> None:
    """Per-image metrics, one row per image and region (``results``: EvalResults or a list)."""
    runs = results if isinstance(results, (list, tuple)) else [results]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "group", "reference", "protocol", "region", *METRIC_KEYS])
        for run in runs:
            for r in run.images:
                w.writerow([r.name, r.group, r.reference, run.protocol, run.region,
                            *(f"{getattr(r, k):.6f}" for k in METRIC_KEYS)])


# --------------------------------------------------------------------------- table

TABLE_KEYS = ("mse", "sad", "grad", "conn")  # the paper's column order


def format_table(results, per_group: bool = False, title: str = "ICM-57") -> str:
    """Paper-style table: one row per run (protocol, references, region) with MSE (plain mean),
    SAD, Grad, Conn (/1000), means over the target images; ``per_group`` adds one block of group
    rows per run. ``results``: an EvalResults or a list of them."""
    runs = list(results) if isinstance(results, (list, tuple)) else [results]
    n_img = max((len(r.images) for r in runs), default=0)
    n_grp = max((len(r.groups) for r in runs), default=0)
    heads = ("Protocol", "Refs", "Region", "Images", "MSE", "SAD", "Grad", "Conn")

    def cells(label, refs, region, n, m):
        return [label, refs, region, str(n), f"{m['mse']:.4f}"] + [f"{m[k]:.2f}" for k in TABLE_KEYS[1:]]

    def block(rows):
        widths = [max(len(heads[i]), *(len(c[i]) for c in rows)) for i in range(len(heads))]
        line = lambda vals: "  ".join([vals[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(vals[1:], widths[1:])])  # noqa: E731
        return [line(heads), "  ".join("-" * w for w in widths)] + [line(c) for c in rows]

    out = [
        f"{title}: {n_grp} groups, {n_img} target images",
        "MSE: mean squared error (no scaling); SAD, Grad, Conn: /1000 (the paper's units)",
        "Region: unknown = trimap unknown band (85 <= t < 170), all = whole image",
    ]
    out += block([cells(r.protocol, str(r.references), r.region, len(r.images), r.mean()) for r in runs])
    if per_group:
        for r in runs:
            counts: Dict[str, int] = {}
            for img in r.images:
                counts[img.group] = counts.get(img.group, 0) + 1
            out += ["", f"per group: {r.protocol}, {r.references} reference(s), region {r.region}"]
            out += block([cells(g, str(r.references), r.region, counts[g], m) for g, m in r.group_means().items()])
    return "\n".join(out)
