"""PNG plots of an ErrorReport (matplotlib, Agg backend; imported only when a report is written)."""

from __future__ import annotations

import io

import numpy as np

from edgequant.analysis.metrics import COSINE_FLAG, SNR_FLAG


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "svg.hashsalt": "edgequant"})
    return plt


def png_of(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def _panel(ax, depth, snr, cosine, title: str, labels: list[str]) -> None:
    snr = np.clip(np.nan_to_num(np.asarray(snr, float), nan=1e3, posinf=1e3), 1e-8, 1e3)
    ax.semilogy(depth, snr, ".-", color="tab:red", lw=0.8, ms=3, label="SNR (noise/signal)")
    ax.axhline(SNR_FLAG, color="tab:red", ls=":", lw=0.8)
    ax.set_ylabel("SNR (lower is better)", color="tab:red")
    ax.set_title(title)
    tw = ax.twinx()
    tw.plot(depth, cosine, ".-", color="tab:blue", lw=0.8, ms=3, label="cosine")
    tw.axhline(COSINE_FLAG, color="tab:blue", ls=":", lw=0.8)
    tw.set_ylabel("cosine", color="tab:blue")
    low = float(np.nanmin(cosine)) if len(cosine) and np.isfinite(cosine).any() else 0.0
    tw.set_ylim(max(-1.0, min(low, COSINE_FLAG) - 0.01), 1.002)
    worst = np.argsort(-snr, kind="stable")[:3]
    for i in worst:
        if snr[i] > SNR_FLAG:
            ax.annotate(labels[i][-32:], (depth[i], snr[i]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    ax.set_xlabel("depth (node index in graph order)")


def summary_png(report) -> bytes | None:
    """Per-tensor (cumulative) and per-layer (isolated) SNR and cosine along depth."""
    panels = []
    if report.graphwise:
        g = report.graphwise
        panels.append(([r.depth for r in g], [r.metrics.snr for r in g], [r.metrics.cosine for r in g],
                       "graphwise: every tensor of the quantized model vs float (cumulative)",
                       [r.name for r in g]))
    if report.layerwise:
        w = report.layerwise
        panels.append(([r.depth for r in w], [r.output.snr for r in w], [r.output.cosine for r in w],
                       "layerwise: model output when only this layer is quantized (isolated)",
                       [r.node for r in w]))
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for ax, (depth, snr, cos, title, labels) in zip(axes[:, 0], panels):
        _panel(ax, np.asarray(depth), snr, np.asarray(cos, float), title, labels)
    fig.tight_layout()
    return png_of(fig)


def histograms_png(report) -> bytes | None:
    """Float vs quantized value histograms of the worst tensors."""
    items = list(report.histograms.items())
    if not items:
        return None
    plt = pyplot()
    cols = min(2, len(items))
    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, (f, q)) in zip(axes.ravel(), items):
        finite = np.isfinite(f) & np.isfinite(q)
        f, q = f[finite], q[finite]
        lo, hi = (float(min(f.min(), q.min())), float(max(f.max(), q.max()))) if f.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 128)
        ax.hist(f, bins=bins, alpha=0.6, label="float", color="tab:blue", log=True)
        ax.hist(q, bins=bins, alpha=0.6, label="quantized", color="tab:orange", log=True)
        ax.set_title(name[-48:], fontsize=8)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(items):]:
        ax.axis("off")
    fig.tight_layout()
    return png_of(fig)
