"""Training curves of a run: `plot_curves(run_dir)` writes RUN_DIR/curves.png from its history.json.

Left panel: every loss term and the total, per epoch (the epoch means in `history.json`). Right panel: the
validation R1 and mAP at each evaluation. Training draws them when it ends; `python -m tools.plot_curves RUN_DIR`
draws them for any run.
"""
from __future__ import annotations

import json
import os
from typing import List

from utils.errors import UserError

FIGSIZE = (10.0, 3.8)  # inches; at DPI this gives a 1100 x 418 pixel picture
DPI = 110
VAL_METRICS = ("R1", "mAP")


def read_history(run_dir: str) -> List[dict]:
    """The per-epoch records of `<run_dir>/history.json` (written by the trainer), checked."""
    path = os.path.join(run_dir, "history.json")
    try:
        with open(path, encoding="utf-8") as f:
            history = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist (is {run_dir} a run folder with at least one finished epoch?)") \
            from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(history, list) or not history or not all(
            isinstance(h, dict) and isinstance(h.get("epoch"), int) and isinstance(h.get("losses"), dict)
            for h in history):
        raise UserError(f"{path}: expected a non-empty list of per-epoch records with 'epoch' and 'losses'")
    return history


def curves_figure(history: List[dict]):
    """The matplotlib figure (two axes: losses, validation metrics) of a run's history."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=FIGSIZE, sharex=True)
    names = sorted({k for h in history for k in h["losses"] if k.endswith("_loss")})
    for name in names + ["loss"]:
        points = [(h["epoch"], h["losses"][name]) for h in history if name in h["losses"]]
        if points:
            xs, ys = zip(*points)
            ax_loss.plot(xs, ys, marker="o", markersize=3, label="total" if name == "loss" else name[:-5],
                         linewidth=2.2 if name == "loss" else 1.2, color="black" if name == "loss" else None)
    ax_loss.set(title="training losses (epoch means)", xlabel="epoch", ylabel="loss")
    ax_loss.legend(fontsize=8)
    evaluated = [h for h in history if isinstance(h.get("val"), dict)]
    for metric in VAL_METRICS:
        points = [(h["epoch"], h["val"][metric]) for h in evaluated if metric in h["val"]]
        if points:
            xs, ys = zip(*points)
            ax_val.plot(xs, ys, marker="o", label=metric)
    ax_val.set(title="validation (text to image)", xlabel="epoch", ylabel="%")
    if evaluated:
        ax_val.legend(fontsize=8)
    else:
        ax_val.text(0.5, 0.5, "no evaluation recorded", ha="center", va="center", transform=ax_val.transAxes)
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def plot_curves(run_dir: str) -> str:
    """Write `<run_dir>/curves.png` from `<run_dir>/history.json`; returns its path."""
    fig = curves_figure(read_history(run_dir))
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, "curves.png")
    try:
        fig.savefig(path, dpi=DPI)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return path
