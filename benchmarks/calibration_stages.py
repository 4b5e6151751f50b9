"""Summarise the finished stages of a calibration run from its stage cache (artifacts/calibration/.stages/<model>/),
for a run that was stopped before it wrote the calibration file: trace boundary counts, ρ per phase (raw and
length-matched, mean over layers and KV heads), codebook MSE against the Beta/Gaussian references.
`python benchmarks/calibration_stages.py [artifacts/calibration/.stages/smollm2-135m]` prints Markdown."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SOURCES = ("document", "prompt", "think", "answer")


def load(folder: Path, stage: str) -> tuple[dict, dict] | None:
    meta = folder / f"{stage}.json"
    if not meta.is_file():
        return None
    values = json.loads(meta.read_text())["values"]
    arrays = folder / f"{stage}.npz"
    data = dict(np.load(arrays, allow_pickle=False)) if arrays.is_file() else {}
    return values, data


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/calibration/.stages/smollm2-135m")
    out = [f"Finished stages in `{folder}`: "
           + ", ".join(sorted(p.stem for p in folder.glob("*.json"))), ""]
    tr = load(folder, "traces")
    if tr:
        out += [f"Traces kept: {len(tr[0]['texts'])} (dropped {tr[0]['dropped']}); boundaries found: "
                f"{tr[0]['boundary_counts']}", ""]
    rho = load(folder, "rho")
    if rho:
        r, counts = rho[1]["rho"], rho[1]["rho_counts"]  # (2 tensors, 2 kinds, S, L, H), (2, 2, S)
        out += ["| tensor, kind | " + " | ".join(SOURCES) + " |", "|---|" + "---:|" * len(SOURCES)]
        for ti, t in enumerate(("keys", "values")):
            for ki, k in enumerate(("raw", "length-matched")):
                out.append(f"| {t} {k} | " + " | ".join(
                    f"{r[ti, ki, si].mean():.3f}" if counts[ti, ki, si] else "n/a" for si in range(len(SOURCES)))
                    + " |")
        out.append("")
    books = load(folder, "codebooks")
    if books:
        mse = books[1]["codebook_mse"]  # (L, 2, B, 3): fitted, beta, gaussian
        bits = sorted(int(k.rsplit("_b", 1)[1]) for k in books[1] if k.startswith("codebook_keys_b"))
        out += ["| held-out MSE per rotated coordinate, mean over layers and K/V | "
                + " | ".join(f"{b} bits" for b in bits) + " |",
                "|---|" + "---:|" * mse.shape[2]]
        for i, kind in enumerate(("fitted (empirical Lloyd-Max)", "Beta (closed form)", "Gaussian")):
            out.append(f"| {kind} | " + " | ".join(f"{x:.3g}" for x in mse[..., i].mean((0, 1))) + " |")
        out.append("")
    pol = load(folder, "policies")
    if pol:
        v = pol[0]
        out += [f"TAQG from ρ (keys, raw) think {v['rho_think']:.3f}, answer {v['rho_answer']:.3f}: the "
                f"{v['taqg_high']} phase gets {v['taqg_b_high']} bits, the rest {v['taqg_b_low']}.", "",
                "| policy (held-out traces) | avg bits | cKL (nats/token) | attention KL |", "|---|---:|---:|---:|"]
        out += [f"| {r['policy']} | {r['avg_bits']:.3f} | {r['ckl']:.5f} | {r['attention_kl']:.2e} |"
                for r in v["rows"]]
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
