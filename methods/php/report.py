"""Expert usage of the PHP head after an evaluation: a printed table and `experts.png` (one panel per block)."""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, List, Optional

import torch
from prettytable import PrettyTable


def usage_report(usage: Dict[str, torch.Tensor]) -> Dict[str, List[dict]]:
    """Per modality and block: each expert's share of routed tokens, the entropy and its maximum (log E)."""
    report: Dict[str, List[dict]] = {}
    for modality, counts in usage.items():
        rows = []
        for block, row in enumerate(counts.double()):
            total = row.sum().item()
            share = (row / total) if total > 0 else torch.zeros_like(row)
            nz = share[share > 0]
            entropy = float(-(nz * nz.log()).sum()) if total > 0 else 0.0
            rows.append({"block": block, "tokens": [int(v) for v in row.tolist()],
                         "share": [round(float(v), 6) for v in share.tolist()],
                         "entropy": entropy, "max_entropy": math.log(len(row))})
        report[modality] = rows
    return report


logger = logging.getLogger("php")


def usage_table(report: Dict[str, list]) -> PrettyTable:
    num_experts = len(next(iter(report.values()))[0]["share"])
    table = PrettyTable(["modality", "block"] + [f"e{i}" for i in range(num_experts)] + ["entropy", "max"])
    for modality, rows in report.items():
        for row in rows:
            table.add_row([modality, row["block"]] + [f"{100 * s:.1f}%" for s in row["share"]]
                          + [f"{row['entropy']:.3f}", f"{row['max_entropy']:.3f}"])
    return table


def plot_usage(report: Dict[str, list], path: str) -> str:
    """One bar chart per EFP block: each expert's share of routed tokens, one bar colour per modality."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modalities = list(report)
    blocks = len(report[modalities[0]])
    num_experts = len(report[modalities[0]][0]["share"])
    fig, axes = plt.subplots(1, blocks, figsize=(3.2 * blocks, 3.0), sharey=True, squeeze=False)
    width = 0.8 / len(modalities)
    for b, ax in enumerate(axes[0]):
        for m, modality in enumerate(modalities):
            row = report[modality][b]
            xs = [e + (m - (len(modalities) - 1) / 2) * width for e in range(num_experts)]
            ax.bar(xs, [100 * s for s in row["share"]], width=width,
                   label=f"{modality} (H={row['entropy']:.2f}/{row['max_entropy']:.2f})")
        # The share every expert would get under perfectly balanced routing.
        ax.axhline(100 / num_experts, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"EFP block {b}")
        ax.set_xticks(range(num_experts), [f"expert {e}" for e in range(num_experts)], fontsize=8)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("share of routed tokens (%)")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def report_expert_usage(usage: Dict[str, torch.Tensor], out_dir: Optional[str] = None) -> Dict[str, list]:
    """Log the usage table, save `<out_dir>/experts.png`, and return the report (JSON-ready).

    A picture that cannot be drawn or written (read-only run folder, broken matplotlib) is only warned about:
    the evaluation's results matter more than the plot.
    """
    report = usage_report(usage)
    logger.info("expert usage of the PHP head (share of routed tokens; entropy vs. its maximum log E):\n%s",
                usage_table(report))
    if out_dir:
        try:
            path = plot_usage(report, os.path.join(out_dir, "experts.png"))
            logger.info("expert usage plot: %s", path)
        except Exception as e:  # noqa: BLE001 - any plotting failure must not lose the evaluation
            logger.warning("could not write %s (%s: %s)", os.path.join(out_dir, "experts.png"),
                           type(e).__name__, e)
    return report
