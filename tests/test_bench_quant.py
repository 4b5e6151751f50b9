"""The equal-bytes verdict of benchmarks/bench_quant.py: Pareto frontier, interpolation, windows, paired stats."""
import importlib.util
import itertools
import math
import statistics
from pathlib import Path

from compactor.evaluation.harness import EvalRow

_spec = importlib.util.spec_from_file_location("bench_quant", Path(__file__).parents[1] / "benchmarks/bench_quant.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_pareto_matches_the_definition():
    pts = [(100, 0.5, "a"), (120, 0.6, "b"), (150, 0.3, "c"), (160, 0.35, "d"), (200, 0.1, "e"), (90, 0.9, "f")]
    dominated = {p for p, q in itertools.permutations(pts, 2) if q[0] <= p[0] and q[1] < p[1]}
    assert bench.pareto(pts) == sorted(set(pts) - dominated)


def test_frontier_interpolates_in_log_log_and_stops_at_its_ends():
    pts = [(100, 0.4, "a"), (400, 0.1, "b"), (300, 0.5, "dominated")]
    lo, hi, f = bench.frontier_at(pts, 200)
    assert (lo[2], hi[2]) == ("a", "b") and math.isclose(f, 0.5)
    # a power law through both points: cKL = 0.4 * (bytes/100)^-1 gives 0.2 at 200 bytes
    assert math.isclose(math.exp((1 - f) * math.log(0.4) + f * math.log(0.1)), 0.2)
    assert bench.frontier_at(pts, 50) is None and bench.frontier_at(pts, 500) is None


def test_windows_are_disjoint_spread_and_fit():
    starts = bench.windows_of(10_000, 2304, 3)
    assert starts[0] == 0 and starts[-1] == 10_000 - 2304 and len(starts) == 3
    assert all(b - a >= 2304 for a, b in zip(starts, starts[1:]))
    assert bench.windows_of(5000, 2304, 9) == [0, 5000 - 2304]  # only two disjoint windows fit
    assert bench.windows_of(2000, 2304, 1) == []


def _row(kv, ckl, ratio=20.0, out=0.3, nbytes=1000):
    return EvalRow("am", ratio, kv, ckl, 0.5, 1.0, out, 0.1, nbytes, 2000, 4000, 0.0)


def test_paired_difference_and_verdict():
    windows = {f"w{i}": [_row("K16V16", 0.20 + d), _row("K8V8", 0.20 + d + e),
                         _row("K3V4", 0.19 + d, out=0.30, nbytes=900),
                         _row("Kq4_0Vq4_0", 0.21 + d + e, out=0.33, nbytes=950)]
               for i, (d, e) in enumerate([(0.0, 0.01), (0.05, -0.01), (-0.03, 0.02)])}
    mean, se, n = bench.paired(windows, 20.0, "Kq4_0Vq4_0", "K3V4", "K3V4", 0.0)
    diffs = [-0.02 - e for e in (0.01, -0.01, 0.02)]  # (0.19 + d) - (0.21 + d + e)
    assert n == 3 and math.isclose(mean, statistics.fmean(diffs))
    assert math.isclose(se, statistics.stdev(diffs) / math.sqrt(3))
    assert bench.noise_floor(windows, 20.0) == f"{statistics.stdev([0.01, -0.01, 0.02]):.4f}"
    rows = bench.mean_rows(windows)
    table, verdicts = bench.equal_bytes(rows, windows, [20.0])
    assert verdicts == [True] and "beyond the frontier's last point" in table  # K3V4: fewer bytes, lower cKL
    worse = {k: [_row(r.kv, r.ckl + (0.05 if r.kv == "K3V4" else 0), nbytes=r.stored_bytes) for r in rows_]
             for k, rows_ in windows.items()}
    assert bench.equal_bytes(bench.mean_rows(worse), worse, [20.0])[1] == [False]
