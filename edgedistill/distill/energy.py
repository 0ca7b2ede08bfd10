"""Energy scoring of the teacher (Kim et al., Knowledge-Based Systems 296 (2024) 111911).

``E(x) = −T_E · logsumexp(z(x) / T_E)``: low energy means the teacher is confident, high energy
that it is uncertain. The training set is sorted once by energy; with fraction ``r`` the
``r·N`` lowest samples form the *low* group and the ``r·N`` highest the *high* group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from edgedistill.base.plots import png, pyplot

LOW, MIDDLE, HIGH = -1, 0, 1


# ---------------------------------------------------------------- pure math


def energy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy of each row of ``logits`` (float32, stable for any logit scale)."""
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def group_count(n: int, fraction: float) -> int:
    """How many samples each extreme group holds: ``floor(r·N)``, robust to float error."""
    return int(np.floor(fraction * n + 1e-9))


def energy_ranks(energy: np.ndarray) -> np.ndarray:
    """Rank of each sample in ascending energy; ties broken by dataset order (stable sort)."""
    order = np.argsort(energy, kind="stable")
    ranks = np.empty(len(energy), dtype=np.int64)
    ranks[order] = np.arange(len(energy))
    return ranks


def spread_by_energy(energy: np.ndarray, n: int) -> np.ndarray:
    """``n`` sample indices at evenly spaced ranks of the energy ranking (sorted ascending): as many confident images
    as uncertain ones, and the middle in proportion. All of them when ``n`` is at least their number."""
    if n >= len(energy):
        return np.arange(len(energy))
    order = np.argsort(energy, kind="stable")
    ranks = np.floor((np.arange(n) + 0.5) * len(energy) / n).astype(np.int64)
    return np.sort(order[ranks])


def assign_groups(energy: np.ndarray, fraction: float) -> tuple[np.ndarray, float, float]:
    """Groups (−1 low, 0 middle, 1 high) and the thresholds ``E_low = sorted[k−1]``, ``E_high = sorted[N−k]``.

    Exactly ``k = floor(r·N)`` samples fall in each extreme group, also with tied energies.
    With ``k = 0`` the thresholds are ∓inf and every sample is in the middle.
    """
    n = len(energy)
    k = group_count(n, fraction)
    if 2 * k > n:
        raise ValueError(f"fraction {fraction} leaves overlapping groups for {n} samples")
    ranks = energy_ranks(energy)
    groups = np.zeros(n, dtype=np.int8)
    groups[ranks < k] = LOW
    groups[ranks >= n - k] = HIGH
    sorted_e = np.sort(energy, kind="stable")
    low = float(sorted_e[k - 1]) if k else float("-inf")
    high = float(sorted_e[n - k]) if k else float("inf")
    return groups, low, high


#: the least gap between the median energies of the low and the high group, in units of T, for the groups to mean
#: something: a teacher that learnt nothing gives every image about −T·log(classes), and groups drawn from ties
GROUP_GAP = 0.1


def groups_apart(energy: np.ndarray, groups: np.ndarray, temperature: float) -> bool:
    """Whether the low- and the high-energy group differ by at least ``GROUP_GAP·T`` (median against median);
    with no extreme groups (fraction 0) there is nothing to tell apart."""
    if not (groups == LOW).any():
        return True
    gap = float(np.median(energy[groups == HIGH]) - np.median(energy[groups == LOW]))
    return gap >= GROUP_GAP * temperature


# ---------------------------------------------------------------- per-batch lookup for training


@dataclass
class EnergyIndex:
    """Answers "which group / energy quantile is this sample in?" during training.

    ``static`` grouping (the paper): the group each training image got in the score stage.
    ``dynamic`` grouping (the authors' code): the live teacher energy of the augmented view,
    compared with the thresholds fixed in the score stage. ``reversed`` direction swaps the
    roles of the two groups (the authors' code gives low-energy samples the *lower* temperature).
    """

    groups: Tensor  # int8 (N,) by dataset index
    quantiles: Tensor  # float32 (N,) rank / N by dataset index
    sorted_energy: Tensor  # float32 (N,)
    threshold_low: float
    threshold_high: float
    temperature: float
    dynamic: bool = False
    reversed: bool = False

    @classmethod
    def from_scores(cls, energy: np.ndarray, index: np.ndarray, groups: np.ndarray, threshold_low, threshold_high, cfg) -> "EnergyIndex":
        n = int(index.max()) + 1 if len(index) else 0
        by_index_group = torch.zeros(n, dtype=torch.int8)
        by_index_q = torch.zeros(n, dtype=torch.float32)
        by_index_group[torch.from_numpy(index)] = torch.from_numpy(groups.astype(np.int8))
        by_index_q[torch.from_numpy(index)] = torch.from_numpy(energy_ranks(energy) / max(len(energy), 1)).float()
        return cls(
            by_index_group, by_index_q, torch.from_numpy(np.sort(energy)).float(),
            threshold_low, threshold_high, cfg.temperature, cfg.grouping == "dynamic", cfg.direction == "reversed",
        )

    @classmethod
    def evenly_spread(cls, n: int, cfg) -> "EnergyIndex":
        """N samples whose energies rise with their index: groups and quantiles of a real score, with no teacher
        run (the plan stage times steps before anything is scored; the cost does not depend on which sample is
        in which group)."""
        energy = np.arange(n, dtype=np.float32)
        groups, low, high = assign_groups(energy, cfg.fraction)
        return cls.from_scores(energy, np.arange(n), groups, low, high, cfg)

    def to(self, device) -> "EnergyIndex":
        self.groups, self.quantiles, self.sorted_energy = (t.to(device) for t in (self.groups, self.quantiles, self.sorted_energy))
        return self

    def static(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        indices = indices.to(self.groups.device)
        return self.groups[indices], self.quantiles[indices]

    def live(self, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        e = energy_from_logits(teacher_logits.detach(), self.temperature).to(self.sorted_energy.device)
        g = torch.zeros_like(e, dtype=torch.int8)
        g[e <= self.threshold_low] = LOW
        g[e >= self.threshold_high] = HIGH
        q = torch.searchsorted(self.sorted_energy, e).float() / max(len(self.sorted_energy), 1)
        return g, q.clamp(max=1 - 1e-6)

    def lookup(self, indices: Tensor | None, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Group and quantile the loss should use, direction applied."""
        g, q = self.live(teacher_logits) if (self.dynamic or indices is None) else self.static(indices)
        if self.reversed:
            g, q = -g, (1 - 1e-6) - q
        return g.to(teacher_logits.device), q.to(teacher_logits.device)


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def score_loader(teacher, loader, device, to_float, temperature: float, progress=None) -> dict[str, np.ndarray]:
    """One teacher pass: per sample its dataset index, label, prediction, confidence and energy."""
    cols: dict[str, list[Tensor]] = {k: [] for k in ("index", "label", "teacher_pred", "confidence", "energy")}
    task = progress.add_task("scoring", total=len(loader), info="") if progress else None
    for images, y, i in loader:
        z = teacher(to_float(images, device)).float()
        conf, pred = torch.softmax(z, 1).max(1)
        for k, v in zip(cols, (i, y, pred, conf, energy_from_logits(z, temperature))):
            cols[k].append(v.cpu())
        if progress:
            progress.update(task, advance=1)
    return {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in cols.items()}


def group_summary(groups: np.ndarray, energy: np.ndarray, confidence: np.ndarray, correct: np.ndarray) -> dict[str, dict]:
    out = {}
    for name, g in (("low", LOW), ("middle", MIDDLE), ("high", HIGH)):
        m = groups == g
        out[name] = {
            "size": int(m.sum()),
            "mean_energy": float(energy[m].mean()) if m.any() else None,
            "mean_confidence": float(confidence[m].mean()) if m.any() else None,
            "teacher_accuracy": float(100 * correct[m].mean()) if m.any() else None,
        }
    return out


# ---------------------------------------------------------------- plots


#: a low-energy tail longer than this share of the whole range is drawn folded into the first bin: confident
#: images can reach energies far below the rest, and drawn to scale they squeeze the thresholds into a corner
TAIL_SHARE = 0.25
TAIL_QUANTILE = 0.01


def histogram_range(energy: np.ndarray) -> tuple[float, float]:
    """The energies the histogram spans: all of them, or from the 1st percentile up when the tail below it is long."""
    lo, hi, cut = float(energy.min()), float(energy.max()), float(np.quantile(energy, TAIL_QUANTILE))
    return (cut, hi) if cut - lo > TAIL_SHARE * (hi - lo) else (lo, hi)


def plot_histogram(energy: np.ndarray, groups: np.ndarray, low: float, high: float, temperature: float) -> bytes:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    lo, hi = histogram_range(energy)
    shown = np.clip(energy, lo, hi)
    bins = np.histogram_bin_edges(shown, bins=60)
    for g, colour, label in ((LOW, "tab:blue", "low (confident)"), (MIDDLE, "tab:gray", "middle"), (HIGH, "tab:red", "high (uncertain)")):
        m = groups == g
        if m.any():
            ax.hist(shown[m], bins=bins, color=colour, alpha=0.75, label=f"{label}: {m.sum()}")
    # E_low's label left of its line and E_high's right of it, at two heights: close thresholds stay readable
    for t, name, side, height in ((low, "E_low", "right", 0.97), (high, "E_high", "left", 0.86)):
        if np.isfinite(t):
            ax.axvline(t, color="black", ls="--", lw=1)
            ax.text(t, height, f" {name}={t:.2f} ", transform=ax.get_xaxis_transform(), fontsize=8, va="top", ha=side,
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    folded = int((energy < lo).sum())
    if folded:
        ax.text(0.01, 0.6, f"{folded} images below {lo:.2f}\n(the long low tail)\nfolded into the first bin",
                transform=ax.transAxes, fontsize=7, va="top", color="tab:blue")
    ax.set_xlabel(f"teacher energy  −T·logsumexp(z/T),  T={temperature:g}")
    ax.set_ylabel("training images")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return png(fig)


def plot_gallery(images: np.ndarray, labels, preds, energies, class_names: list[str], per_row: int = 8) -> bytes:
    """Two rows of thumbnails: the lowest-energy images, then the highest-energy ones."""
    plt = pyplot()

    n = len(images)
    rows = max(1, int(np.ceil(n / per_row)))
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 1.35, rows * 1.6), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, y, p, e in zip(axes.flat, images, labels, preds, energies):
        ax.imshow(img, interpolation="nearest")
        ok = "green" if y == p else "red"
        ax.set_title(f"{class_names[y][:10]}\n→{class_names[p][:10]}  E={e:.1f}", fontsize=6, color=ok)
    fig.suptitle("lowest energy (top rows) · highest energy (bottom rows); label → teacher guess", fontsize=8)
    fig.tight_layout()
    return png(fig)
