"""The doctor's report: the check ids, the thresholds, a `Finding` per check and the `Report`
that gathers them, prints them and writes them (``report.md``, ``report.json``, PNG figures).

Nothing here runs a model: `jaxdl.doctor.probe` runs the training, `jaxdl.doctor.checks` turn its
measurements into findings. docs/doctor.md gives each check's source and each threshold's reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import numpy as np

__all__ = [
    "CHECKS",
    "SEVERITIES",
    "THRESHOLDS",
    "Finding",
    "Report",
    "jsonable",
    "layer_index",
    "layer_kind",
]

CHECKS = (
    "data",
    "initial_loss",
    "gradient_check",
    "symmetry",
    "overfit",
    "learning_rate",
    "update_ratio",
    "activations",
    "gradients",
    "batchnorm",
)

SEVERITIES = ("ok", "warn", "fail")


# Every threshold in one place; docs/doctor.md says where each comes from.
THRESHOLDS: dict[str, float] = {
    "data_mean": 1.0,  # warn when |mean of the inputs| exceeds this (CSE 176 Lecture 11: centre)
    "data_std_low": 0.1,  # warn when the inputs' std is outside [low, high] (unit scale)
    "data_std_high": 10.0,
    "data_rare_class": 0.2,  # warn when a class has fewer than this x the median count
    "data_duplicates": 0.01,  # warn when this fraction of validation examples is in train
    "initial_loss_warn": 0.25,  # |loss / ln C - 1| above: warn
    "initial_loss_high": 3.0,  # loss / ln C above: fail (He init of the output layer gives ~2)
    "initial_loss_low": 0.5,  # loss / ln C below: fail (below the label entropy: a leak)
    "gradient_check_fail": 1e-2,  # relative error per leaf: a wrong gradient is off by O(1)
    "gradient_check_warn": 1e-4,  # kinks (ReLU, max pool) crossed by +-eps reach ~1e-3
    "gradient_check_eps": 1e-6,  # finite-difference step (float64)
    "symmetry_tol": 1e-3,  # units closer than this (relative) count as identical
    "symmetry_frac": 0.1,  # fail when this fraction of a layer's units are clones
    "overfit_ok": 0.99,  # training accuracy on the subset: ok at or above
    "overfit_fail": 0.9,  # fail below (warn in between)
    "lr_suggest_warn": 100.0,  # warn when the suggestion is this many times the configured rate
    "update_ratio_low": 1e-4,  # warn when a layer's median ratio leaves [low, high]
    "update_ratio_high": 1e-2,
    "dead_warn": 0.25,  # fraction of ReLU units that never activate
    "dead_fail": 0.5,
    "saturated_warn": 0.1,  # fraction of sigmoid/tanh outputs in the flat tails
    "saturated_fail": 0.5,
    "scale_ratio": 100.0,  # std of the last hidden pre-activation vs the first: warn beyond
    "grad_ratio_warn": 1e2,  # RMS gradient, last layer vs first (or first vs last): warn
    "grad_ratio_fail": 1e4,  # fail
    "batchnorm_warn": 0.5,  # (eval loss - train loss) / train loss: warn
    "batchnorm_fail": 2.0,  # fail
}


_ACTIVATION_KINDS = ("relu", "sigmoid", "tanh", "leakyrelu", "prelu", "elu", "maxout")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One check's verdict: ``severity`` ("ok", "warn", "fail"), what was measured (``message``),
    what to change (``advice``) and the numbers behind it (``evidence``, JSON-able).

    Args:
      check: one of `CHECKS`.
      severity: ``"ok"``, ``"warn"`` or ``"fail"``.
      message: what was measured.
      advice: what to change (empty when ok).
      evidence: the numbers, JSON-able.
    """

    check: str
    severity: str
    message: str
    advice: str = ""
    evidence: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.check not in CHECKS:
            raise ValueError(f"Finding: check={self.check!r}; expected one of {CHECKS}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding: severity={self.severity!r}; expected one of {SEVERITIES}")
        object.__setattr__(self, "evidence", jsonable(self.evidence))


@dataclasses.dataclass
class Report:
    """What `examine` found: ``findings`` (one `Finding` per check run, in `CHECKS` order),
    ``info`` (sizes, configured rate, wall times) and the data behind the figures
    (``curves``: range test and probe run; ``histograms``: per-layer activations and gradients
    at initialization and after the probe run)."""

    findings: list
    info: dict = dataclasses.field(default_factory=dict)
    curves: dict = dataclasses.field(default_factory=dict)
    histograms: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no finding has severity "fail"."""
        return all(f.severity != "fail" for f in self.findings)

    def __getitem__(self, check: str) -> Finding:
        """The finding of ``check`` (KeyError when it was not run)."""
        for f in self.findings:
            if f.check == check:
                return f
        raise KeyError(
            f"Report: no finding for check {check!r}; checks run: {[f.check for f in self.findings]}"
        )

    def summary(self) -> str:
        """The plain-text report: one line per check, advice under each problem."""
        n_fail = sum(f.severity == "fail" for f in self.findings)
        n_warn = sum(f.severity == "warn" for f in self.findings)
        i = self.info
        head = (
            f"jaxdl doctor: {'OK' if self.ok else 'PROBLEMS FOUND'}: {len(self.findings)} checks, "
            f"{n_fail} fail, {n_warn} warn"
        )
        lines = [head]
        if i:
            lines.append(
                f"  model: {i.get('layers', '?')} layers, {i.get('parameters', 0):,} parameters, "
                f"{i.get('num_classes', '?')} classes; {i.get('train_examples', 0):,} training / "
                f"{i.get('validation_examples', 0):,} validation examples; "
                f"{i.get('wall_time_s', 0):.1f} s"
            )
        for f in self.findings:
            tag = {"ok": " ok ", "warn": "WARN", "fail": "FAIL"}[f.severity]
            lines.append(f"[{tag}] {f.check:<15} {f.message}")
            if f.severity != "ok" and f.advice:
                lines.append(f"{'':22}-> {f.advice}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Everything as JSON-able values (non-finite numbers become None)."""
        return jsonable(
            {
                "ok": self.ok,
                "info": self.info,
                "findings": [dataclasses.asdict(f) for f in self.findings],
                "curves": self.curves,
            }
        )

    def write(self, out_dir: str) -> list[str]:
        """Write ``report.md``, ``report.json`` and the PNG figures into ``out_dir`` (created if
        needed); returns the paths written. Figures: ``activations.png`` and ``gradients.png``
        (per-layer histograms at initialization and after the probe run), ``lr_range.png`` (the
        range test's loss against the rate), ``update_ratios.png`` (per layer, over the probe)."""
        os.makedirs(out_dir, exist_ok=True)
        figures = _write_figures(self, out_dir)
        paths = [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")]
        with open(paths[0], "w") as fh:
            json.dump(self.to_dict(), fh, indent=1, allow_nan=False)
        with open(paths[1], "w") as fh:
            fh.write(_markdown(self, [os.path.basename(p) for p in figures]))
        return paths + figures


def jsonable(value):
    """``value`` with numpy/JAX arrays and scalars as lists and Python numbers, non-finite
    floats as None (what ``json.dump(..., allow_nan=False)`` takes)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)):
        return jsonable(np.asarray(value).tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def layer_index(name: str) -> tuple:
    """Sort key of a layer name: ``(i, name)`` for ``kind_i``, after every numbered layer otherwise."""
    m = re.search(r"_(\d+)$", name)
    return (int(m.group(1)), name) if m else (1 << 30, name)


def layer_kind(name: str) -> str:
    """The kind of a layer name: ``dense`` for ``dense_0``."""
    return re.sub(r"_\d+$", "", name)


def _write_figures(report: Report, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)

    for what in ("activations", "gradients"):
        names = []
        for when in ("init", "probe"):
            for k in sorted(report.histograms.get(when, {}).get(what, {}), key=layer_index):
                if k not in names and (
                    what == "gradients"
                    or layer_kind(k) in ("dense", "conv", "batchnorm", "maxout")
                    or layer_kind(k) in _ACTIVATION_KINDS
                ):
                    names.append(k)
        if not names:
            continue
        cols = min(4, len(names))
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
        for ax, name in zip(axes.ravel(), names, strict=False):
            for when, color in (("init", "tab:blue"), ("probe", "tab:orange")):
                h = report.histograms.get(when, {}).get(what, {}).get(name)
                if h is not None:
                    counts, edges = np.asarray(h[0]), np.asarray(h[1])
                    ax.stairs(counts, edges, color=color, label="init" if when == "init" else "after probe")
            ax.set_title(name, fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in axes.ravel()[len(names) :]:
            ax.axis("off")
        axes.ravel()[0].legend(fontsize=7)
        fig.suptitle(
            f"per-layer {'activation' if what == 'activations' else 'gradient'} histograms", fontsize=10
        )
        save(fig, f"{what}.png")
    lr = report.curves.get("lr_range")
    if lr is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        losses = np.asarray(lr["losses"], np.float64)
        ax.plot(lr["lrs"], np.where(np.isfinite(losses), losses, np.nan), color="tab:blue")
        ax.set_xscale("log")
        ax.axvline(lr["configured"], color="k", ls="--", label=f"configured {lr['configured']:.2g}")
        if lr["suggested"] is not None:
            ax.axvline(lr["suggested"], color="tab:green", ls=":", label=f"suggested {lr['suggested']:.2g}")
        if lr["diverged"] is not None:
            ax.axvline(lr["diverged"], color="tab:red", ls="-.", label=f"diverges {lr['diverged']:.2g}")
        finite = losses[np.isfinite(losses)]
        if finite.size:
            ax.set_ylim(0, min(finite.max(), 3 * finite[0]) * 1.05 + 1e-9)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title("learning-rate range test")
        ax.legend(fontsize=8)
        save(fig, "lr_range.png")
    probe = report.curves.get("probe")
    if probe is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in probe["update_ratio"].items():
            ax.plot(np.maximum(np.asarray(r, np.float64), 1e-12), label=name)
        ax.set_yscale("log")
        ax.axhspan(
            THRESHOLDS["update_ratio_low"], THRESHOLDS["update_ratio_high"], color="tab:green", alpha=0.1
        )
        ax.axhline(1e-3, color="k", ls="--", lw=0.8)
        ax.set_xlabel("probe step")
        ax.set_ylabel("||update|| / ||weights||")
        ax.set_title("update/weight ratio per layer (want ~1e-3)")
        ax.legend(fontsize=7, ncol=2)
        save(fig, "update_ratios.png")
    return paths


def _markdown(report: Report, figures: list[str]) -> str:
    lines = [
        "# jaxdl doctor report",
        "",
        "```",
        report.summary(),
        "```",
        "",
        "| check | severity | finding | advice |",
        "| --- | --- | --- | --- |",
    ]
    for f in report.findings:
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| `{f.check}` | {f.severity} | {cell(f.message)} | {cell(f.advice)} |")
    lines.append("")
    for f in report.findings:
        lines += [f"## {f.check}: {f.severity}", "", f.message, ""]
        if f.advice:
            lines += [f"*What to do:* {f.advice}", ""]
        lines += ["```json", json.dumps(f.evidence, indent=1, allow_nan=False), "```", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{p}]({p})" for p in figures] + [""]
    return "\n".join(lines)
