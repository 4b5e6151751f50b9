"""The calibration report: a Markdown summary and PNG plots (ρ per layer and phase, raw and length-matched; MSE of
the codebooks per bit width; per-head budget heat map), and the JSON summary stored in the calibration file."""
from __future__ import annotations

from pathlib import Path


from ..capture.phases import PHASE_NAMES
from ..storage.calibration_file import CODEBOOK_KINDS

SOURCES = ("document", *PHASE_NAMES)


def _r(x: float, n: int = 4) -> float:
    return float(round(float(x), n))


def summary(results: dict, timings: dict, seconds: float, resumed: list[str]) -> dict:
    """JSON-able summary kept in the calibration file's meta (informative)."""
    rho = results["rho"]["rho"]
    books = results["codebooks"]
    pol = results["policies"]
    return {
        "seconds": seconds, "stage_seconds": timings, "resumed_stages": resumed,
        "boundaries": results["traces"]["boundary_counts"], "traces": len(results["traces"]["texts"]),
        "rho_mean": {f"{t} {k}": {src: _r(rho[ti, ki, si].mean()) for si, src in enumerate(SOURCES)}
                     for ti, t in enumerate(("keys", "values")) for ki, k in enumerate(("raw", "matched"))},
        "codebook_mse_mean": {kind: [float(f"{v:.4g}") for v in books["codebook_mse"][..., i].mean((0, 1))]
                              for i, kind in enumerate(CODEBOOK_KINDS)},
        "phase_codebooks_used": int(books["phase_codebook_used"].sum()),
        "taqg": {"rho_think": _r(pol["rho_think"]), "rho_answer": _r(pol["rho_answer"]),
                 "high": pol["taqg_high"], "b_low": pol["taqg_b_low"], "b_high": pol["taqg_b_high"]},
        "policies": [{k: (_r(v, 6) if isinstance(v, float) else v) for k, v in row.items()} for row in pol["rows"]],
        "check": [{k: (_r(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
                  for row in results["check"]["rows"]],
    }


def _plots(folder: Path, results: dict, arrays: dict, settings) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rho = results["rho"]["rho"]  # (2, 2, S, L, H)
    L = rho.shape[3]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ti, t in enumerate(("keys", "values")):
        for ki, k in enumerate(("raw", f"length-matched ({settings.window}-token windows)")):
            ax = axes[ti, ki]
            for si, src in enumerate(SOURCES):
                ax.plot(range(L), rho[ti, ki, si].mean(-1), marker=".", label=src)
            ax.set_title(f"{t}: ρ {k}")
            ax.set_ylabel("mean pairwise cosine")
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("layer")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(folder / "rho.png", dpi=110)
    plt.close(fig)
    made.append("rho.png")

    mse = results["codebooks"]["codebook_mse"]  # (L, 2, B, 3)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ti, t in enumerate(("keys", "values")):
        ax = axes[ti]
        for i, kind in enumerate(CODEBOOK_KINDS):
            ax.semilogy(settings.codebook_bits, mse[:, ti, :, i].mean(0), marker="o", label=kind)
        ax.set_title(f"{t}: held-out MSE per coordinate (mean over layers)")
        ax.set_xlabel("bits")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "mse.png", dpi=110)
    plt.close(fig)
    made.append("mse.png")

    check = results["check"]
    maps = [(k, v) for k, v in check.items() if k.startswith("budgets_")]
    if maps:
        fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.5 * (len(maps) + 1), 6))
        im = axes[0].imshow(arrays["head_weights"], aspect="auto", cmap="viridis")
        axes[0].set_title("head weight (sensitivity)")
        fig.colorbar(im, ax=axes[0])
        for ax, (k, v) in zip(axes[1:], maps):
            im = ax.imshow(v, aspect="auto", cmap="magma")
            ax.set_title(k.replace("budgets_", "budgets: ").replace("_", " ") + f" @ {settings.check_ratio:g}x")
            fig.colorbar(im, ax=ax)
        for ax in axes:
            ax.set_xlabel("KV head")
            ax.set_ylabel("layer")
        fig.tight_layout()
        fig.savefig(folder / "budgets.png", dpi=110)
        plt.close(fig)
        made.append("budgets.png")
    return made


def _table(head: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def write_report(folder: str | Path, model_id: str, results: dict, arrays: dict, meta: dict, settings) -> Path:
    """report.md and its PNGs in `folder`; returns the Markdown path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        plots = _plots(folder, results, arrays, settings)
    except ImportError:
        plots = []
    sm = meta["summary"]
    lines = [f"# Calibration of {model_id}", "",
             f"compactor {meta['compactor_version']}, {meta['created']}; {sm['seconds']:.0f} s "
             f"(stages: {', '.join(f'{k} {v:.0f} s' for k, v in sm['stage_seconds'].items())}"
             + (f"; reused: {', '.join(sm['resumed_stages'])}" if sm["resumed_stages"] else "") + ").", "",
             "## Phase boundaries", "",
             f"{sm['traces']} traces; how each boundary was found:", "",
             _table(["boundary", "count"], [[k, v] for k, v in sm["boundaries"].items()]), "",
             "## Redundancy ρ (mean pairwise cosine, mean over layers and KV heads)", "",
             _table(["tensor, kind", *SOURCES], [[k, *v.values()] for k, v in sm["rho_mean"].items()]), "",
             f"Length-matched: mean over consecutive {settings.window}-token windows of each phase (the same token "
             "count in every phase); raw: all tokens of the phase at once. " + ("![rho](rho.png)" if plots else ""), "",
             "## Codebooks (held-out MSE per rotated coordinate, mean over layers and K/V)", "",
             _table(["codebook", *[f"{b} bits" for b in settings.codebook_bits]],
                    [[k, *v] for k, v in sm["codebook_mse_mean"].items()]), "",
             f"Per-phase codebooks used where they lower held-out MSE by {settings.phase_gain:.0%}: "
             f"{sm['phase_codebooks_used']} of {arrays['phase_codebook_used'].size}. "
             + ("![mse](mse.png)" if plots else ""), "",
             "## Bit allocation on held-out traces", "",
             f"TAQG (keys, raw ρ): think {sm['taqg']['rho_think']}, answer {sm['taqg']['rho_answer']}: the "
             f"{sm['taqg']['high']} phase gets {sm['taqg']['b_high']} bits, the others {sm['taqg']['b_low']}.", "",
             _table(["policy", "avg bits", "cKL (nats/token)", "attention KL"],
                    [[r["policy"], f"{r['avg_bits']:.3f}", f"{r['ckl']:.5f}", f"{r['attention_kl']:.2e}"]
                     for r in sm["policies"]]), "",
             "## Held-out document check (AM at "
             f"{settings.check_ratio:g}x, {settings.check_bits} average)", "",
             _table(["configuration", "cKL", "retention", "stored bytes", "memory bytes"],
                    [[r["config"], f"{r['ckl']:.5f}", f"{r['retention']:.3f}", f"{r['stored_bytes']:,}",
                      f"{r['memory_bytes']:,}"] for r in sm["check"]]), "",
             f"Defaults `compress` applies, fast preset (layer/global budgets): {meta['defaults']}; quality preset "
             f"(split budgets): {meta.get('defaults_split')}. " + ("![budgets](budgets.png)" if plots else ""), ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
