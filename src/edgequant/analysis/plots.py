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


def _label_worst(ax, depth, values, labels: list[str], worst: np.ndarray) -> None:
    """Name the worst points, each label on its own line of offsets so that none overlap."""
    for k, i in enumerate(worst):
        ax.annotate(labels[i][-36:], (depth[i], values[i]), fontsize=7, xytext=(6, -12 - 11 * k),
                    textcoords="offset points", arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4"})


def _cosine_panel(ax, depth, cosine, title: str, labels: list[str]) -> None:
    ax.plot(depth, cosine, ".-", color="tab:blue", lw=0.8, ms=3)
    ax.axhline(COSINE_FLAG, color="tab:red", ls=":", lw=0.8, label=f"flag: cosine < {COSINE_FLAG}")
    finite = np.isfinite(cosine)
    low = float(np.min(cosine[finite])) if finite.any() else 0.0
    ax.set_ylim(max(-1.0, min(low, COSINE_FLAG) - 0.01), 1.002)
    ax.set_ylabel("cosine vs float (higher is better)")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=7)
    worst = [i for i in np.argsort(np.where(finite, cosine, -2.0), kind="stable")[:3] if cosine[i] < COSINE_FLAG]
    _label_worst(ax, depth, cosine, labels, np.asarray(worst, int))


def _noise_panel(ax, depth, snr, labels: list[str]) -> None:
    snr = np.clip(np.nan_to_num(np.asarray(snr, float), nan=1e3, posinf=1e3), 1e-8, 1e3)
    ax.semilogy(depth, snr, ".-", color="tab:purple", lw=0.8, ms=3)
    ax.axhline(SNR_FLAG, color="tab:red", ls=":", lw=0.8, label=f"flag: noise/signal > {SNR_FLAG}")
    ax.set_ylabel("noise power / signal power\n(log; lower is better)")
    ax.set_xlabel("depth (node index in graph order)")
    ax.legend(loc="upper left", fontsize=7)
    worst = [i for i in np.argsort(-snr, kind="stable")[:3] if snr[i] > SNR_FLAG]
    _label_worst(ax, depth, snr, labels, np.asarray(worst, int))


def summary_png(report) -> bytes | None:
    """Along depth, one measure a panel: cosine, then noise/signal, for every tensor of the
    quantized model (cumulative) and for each layer quantized alone (isolated)."""
    panels = []
    if report.graphwise:
        g = report.graphwise
        panels.append(([r.depth for r in g], [r.metrics.snr for r in g], [r.metrics.cosine for r in g],
                       "graphwise: every tensor of the quantized model vs float (error accumulates)",
                       [r.name for r in g]))
    if report.layerwise:
        w = report.layerwise
        panels.append(([r.depth for r in w], [r.output.snr for r in w], [r.output.cosine for r in w],
                       "layerwise: the model's output when only this layer is quantized (isolated)",
                       [r.node for r in w]))
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(2 * len(panels), 1, figsize=(11, 3.0 * 2 * len(panels)), squeeze=False)
    for k, (depth, snr, cos, title, labels) in enumerate(panels):
        top, bottom = axes[2 * k, 0], axes[2 * k + 1, 0]
        _cosine_panel(top, np.asarray(depth), np.asarray(cos, float), title, labels)
        _noise_panel(bottom, np.asarray(depth), snr, labels)
        bottom.sharex(top)
    fig.tight_layout()
    return png_of(fig)


def histograms_png(report) -> bytes | None:
    """Float vs quantized value histograms of the worst tensors, with the range the
    quantized tensor can represent marked (values beyond it are clipped)."""
    items = list(report.histograms.items())
    if not items:
        return None
    plt = pyplot()
    cols = min(2, len(items))
    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.8 * cols, 3.4 * rows), squeeze=False)
    clips = getattr(report, "clip_ranges", {})
    for ax, (name, (f, q)) in zip(axes.ravel(), items):
        finite = np.isfinite(f) & np.isfinite(q)
        f, q = f[finite], q[finite]
        lo, hi = (float(min(f.min(), q.min())), float(max(f.max(), q.max()))) if f.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 128)
        ax.hist(f, bins=bins, alpha=0.6, label="float", color="tab:blue", log=True)
        ax.hist(q, bins=bins, alpha=0.6, label="quantized", color="tab:orange", log=True)
        clip = clips.get(name)
        if clip is not None:
            beyond = int(np.count_nonzero((f < clip[0]) | (f > clip[1])))
            for x in clip:
                ax.axvline(x, color="tab:red", ls="--", lw=0.9)
            ax.plot([], [], color="tab:red", ls="--", lw=0.9,
                    label=f"quantized range [{clip[0]:.3g}, {clip[1]:.3g}]: {beyond} of {f.size} float values "
                          "beyond it (clipped)")
        ax.set_title(name[-56:], fontsize=8)
        ax.set_xlabel("value")
        ax.set_ylabel("count (log scale)")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(items):]:
        ax.axis("off")
    fig.suptitle(f"values of the {len(items)} worst tensors over {getattr(report, 'histogram_samples', 0) or 'the'} "
                 "samples: float against quantized", fontsize=9)
    fig.tight_layout()
    return png_of(fig)
