"""The profiler's charts: shares by the book's groups (fig. 8-14), fastconv next to PyTorch, as
a table and a chart (:func:`plot_comparison`), and a profile's time by layer type
(:func:`plot_by_type`), drawn with :mod:`fastconv.plots`."""

from __future__ import annotations

import numpy as np

from ..plots import pyplot

__all__ = ["GROUPS", "chart_groups", "comparison_table", "plot_comparison", "plot_by_type"]

#: the chart's categories (the book's fig. 8-14 groups, and depthwise convolutions apart);
#: every other type is "other"
GROUPS = ("conv", "depthwise", "pool", "BN", "dense", "activation", "other")
_GROUP_OF = {"conv": "conv", "depthwise": "depthwise", "pool": "pool", "norm": "BN",
             "dense": "dense", "activation": "activation"}  # fmt: skip


def chart_groups(by_type_ms: dict, part: str) -> dict:
    """Shares of the chart groups (``GROUPS``) in ``part``: "forward" (the layers' forward
    time only, as the book's figure) or "step" (everything, loss, update and framework time
    included, under "other"). Sums to 1."""
    if part not in ("forward", "step"):
        raise ValueError(f"part must be 'forward' or 'step', got {part!r}")
    ms = dict.fromkeys(GROUPS, 0.0)
    for kind, t in by_type_ms.items():
        if part == "forward":
            if kind in ("loss", "update", "framework"):
                continue
            value = t["forward"]
        else:
            value = t["forward"] + t["backward"]
        ms[_GROUP_OF.get(kind, "other")] += value
    total = sum(ms.values())
    return {k: (v / total if total else 0.0) for k, v in ms.items()}


def _bars(result) -> list:
    """(label, shares, ms) rows of one implementation's profile."""
    ms = result.by_type_ms
    if not result.training:
        return [("forward (inference)", chart_groups(ms, "step"), result.step_ms)]
    forward_ms = sum(
        v["forward"] for k, v in ms.items() if k not in ("loss", "update", "framework")
    )
    return [
        ("forward", chart_groups(ms, "forward"), forward_ms),
        ("training step", chart_groups(ms, "step"), result.step_ms),
    ]


def comparison_table(fc_result, torch_result=None) -> str:
    """Shares of the chart groups, fastconv and (if given) PyTorch, per pass."""
    rows = [("fastconv " + label, g, ms) for label, g, ms in _bars(fc_result)]
    if torch_result is not None:
        rows += [("PyTorch " + label, g, ms) for label, g, ms in _bars(torch_result)]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{g:>11}" for g in GROUPS) + f"{'ms':>10}"]
    for label, shares, ms in rows:
        lines.append(
            f"{label:<{width}}" + "".join(f"{shares[g]:>11.1%}" for g in GROUPS) + f"{ms:>10.1f}"
        )
    return "\n".join(lines)


_COLORS = {"conv": "#d62728", "depthwise": "#e377c2", "pool": "#1f77b4", "BN": "#9467bd",
           "dense": "#ff7f0e", "activation": "#2ca02c", "other": "#7f7f7f"}  # fmt: skip


def plot_comparison(fc_result, torch_result, path, title="") -> None:
    """Horizontal stacked bars of the groups' shares (the book's fig. 8-14), fastconv and
    PyTorch side by side (``torch_result`` may be None), one bar per pass, ms at the right."""
    plt = pyplot()
    rows = [(f"fastconv {fc_result.dtype}\n{label}", g, ms) for label, g, ms in _bars(fc_result)]
    if torch_result is not None:
        rows += [(f"PyTorch float32\n{label}", g, ms) for label, g, ms in _bars(torch_result)]
    rows = rows[::-1]  # first row on top
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.3))
    for i, (_, shares, ms) in enumerate(rows):
        left = 0.0
        for g in GROUPS:
            w = shares[g]
            ax.barh(i, w, left=left, color=_COLORS[g], label=g if i == 0 else None)
            if w >= 0.06:
                ax.text(left + w / 2, i, f"{w:.0%}", ha="center", va="center", fontsize=8,
                        color="white")  # fmt: skip
            left += w
        ax.text(1.01, i, f"{ms:.0f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the time")
    ax.set_title(title, fontsize=9)
    ax.legend(ncol=len(GROUPS), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28 if
              len(rows) < 3 else -0.18), frameon=False)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_by_type(result, path) -> None:
    """Bar chart of a :class:`~fastconv.profiler.ProfileResult`'s time per step by layer type,
    forward and backward side by side."""
    plt = pyplot()
    names = list(result.by_type_ms)
    fwd = [result.by_type_ms[n]["forward"] for n in names]
    bwd = [result.by_type_ms[n]["backward"] for n in names]
    pos = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(pos - 0.2, fwd, 0.4, label="forward")
    ax.bar(pos + 0.2, bwd, 0.4, label="backward (update for 'update')")
    ax.set_xticks(pos, names)
    ax.set_ylabel("ms per step")
    mode = "training step" if result.training else "forward pass"
    ax.set_title(
        f"{mode}, {result.backend} {result.dtype}, batch {result.batch_size}: "
        f"conv {result.conv_share:.0%} (forward {result.forward_conv_share:.0%})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
