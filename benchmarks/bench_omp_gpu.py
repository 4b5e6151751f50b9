"""OMP-fast key selection time on the GPU: random-weight Llama-3.1-8B shape, T = 8k, batched over a layer's KV heads.

A random-weight model (benchmarks/bench_compaction_gpu.random_model) prefills random ids with query capture; then, for
a few layers, the mass matrices A (B = KV heads, n queries, T keys) are built and `omp_select_batched`
(compactor/fitting/omp.py) picks t = T / ratio keys per head, against highest-attention selection (top-k of the RMS
score) of the same heads. Reported: ms per head for each schedule (keys per step k, NNLS refit every s steps), and
the mass-fit residual ||A_S w - 1|| / sqrt(n) that each selection leaves (NNLS on the chosen keys).
Reference point (DESIGN.md): the AM research code's OMP-fast takes 0.81 s per head at T = 8k on an H100.

GPU:  python benchmarks/bench_omp_gpu.py                    (writes benchmarks/results_omp_gpu.md)
CPU dry run (toy sizes, same code path):  python benchmarks/bench_omp_gpu.py --tiny
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_compaction_gpu import random_model, sync_time, tokenizer  # noqa: E402


def mass_matrix(q: torch.Tensor, k: torch.Tensor, scale: float, lse: torch.Tensor) -> torch.Tensor:
    """(B, n, T) float64 shares of each query's mass: exp(scale q.k - lse)."""
    return torch.exp(scale * torch.einsum("bnd,btd->bnt", q.double(), k.double()) - lse.double()[..., None])


def residual(A: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    from compactor.fitting.omp import nnls_batched

    A_S = torch.gather(A, 2, idx[:, None, :].expand(-1, A.shape[1], -1))
    w = nnls_batched(A_S.transpose(1, 2) @ A_S, A_S.sum(1))
    return (torch.einsum("bns,bs->bn", A_S, w) - 1).norm(dim=1) / A.shape[1] ** 0.5


def main() -> None:
    from compactor.capture.prefill import prefill_and_capture
    from compactor.fitting.key_selection import key_stats
    from compactor.fitting.omp import omp_select_batched

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-3.1-8b")
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--ratio", type=float, default=10)
    ap.add_argument("--max-queries", type=int, default=8192)
    ap.add_argument("--layers", default="0,15,31", help="layers whose heads are timed")
    ap.add_argument("--schedules", default="4:2,8:4,16:4", help="k:s pairs (keys per step : refit every s steps)")
    ap.add_argument("--out", default="benchmarks/results_omp_gpu.md")
    ap.add_argument("--tiny", action="store_true", help="dry run on the CPU with toy sizes")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_omp_gpu.py needs a CUDA device (or --tiny for a CPU dry run)")
    T, n_q = (256, 256) if args.tiny else (args.T, args.max_queries)
    layers = [0, 1] if args.tiny else [int(x) for x in args.layers.split(",")]
    model = random_model(args.config, device, args.tiny)
    ids = torch.randint(0, model.config.vocab_size, (T,), generator=torch.Generator().manual_seed(T))
    cap = prefill_and_capture(model, tokenizer(), ids, chunk_size=4096, max_queries=n_q, progress=False)
    t = int(round(T / args.ratio))
    schedules = [tuple(int(v) for v in s.split(":")) for s in args.schedules.split(",")]
    rows = []
    for l in layers:
        q, k, v = cap.queries[l], cap.keys[l], cap.values[l]
        stats = key_stats(k, v, q, cap.scale)
        A = mass_matrix(q, k, cap.scale, stats.lse)
        B = A.shape[0]
        top, secs = sync_time(lambda: torch.topk(stats.p_rms, t, dim=1).indices.sort(1).values)
        rows.append((l, "highest attention", B, secs, float(residual(A, top).mean())))
        omp_select_batched(A[:, :, :], min(t, 8), 4, 2)  # warm-up (cuSOLVER handles), not timed
        for kk, ss in schedules:
            idx, secs = sync_time(lambda: omp_select_batched(A, t, kk, ss))
            rows.append((l, f"OMP-fast k={kk} s={ss}", B, secs, float(residual(A, idx).mean())))
        for r in rows[-1 - len(schedules):]:
            print(r, flush=True)
        del A
        if device == "cuda":
            torch.cuda.empty_cache()
    head = ("| layer | selection | heads | s (all heads of the layer) | ms / head | mass residual |\n"
            "|---:|---|---:|---:|---:|---:|")
    table = "\n".join([head] + [f"| {l} | {name} | {B} | {s:.3f} | {1000 * s / B:.1f} | {res:.4f} |"
                                for l, name, B, s, res in rows])
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    text = (f"# OMP-fast key selection timing\n\n- date: {datetime.date.today()}\n- device: {dev}, torch "
            f"{torch.__version__}\n- command: `python {' '.join(sys.argv)}`\n- {args.config} shape (random weights, "
            f"bf16), T={T}, {cap.queries[0].shape[1]} queries per KV head, t={t} keys per head (ratio "
            f"{args.ratio:g}); mass matrices float64, batched over the layer's KV heads\n\n{table}\n")
    print(table)
    if not args.tiny:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
