"""Shared pieces of the benchmark suites (pytest-benchmark; timings are reported, never asserted).

* Files named ``bench_*.py`` under ``benchmarks/`` are collected, so ``python3 -m pytest benchmarks/
  --benchmark-only`` runs every suite (a file given explicitly is collected as usual).
* ``fusion_results``: a session-wide dict the fusion benchmarks record their medians in; at the end
  of the run the fusion table (time, GFLOP/s, % of the sgemm measured in the same run, ratios) is
  printed, and written as Markdown to ``$RECO_REF_BENCH_TABLE`` when that variable names a file.
"""

from __future__ import annotations

import os

# Before any OpenMP runtime starts (numba's and torch's): workers sleep instead of spin-waiting
# between parallel regions.  On a small shared machine spinning workers of one pool starve the other
# pool (numba kernels ↔ BLAS GEMMs, torch ops): measured 2–10× slower steps for BOTH numba and torch.
# Set OMP_WAIT_POLICY yourself to override; the table records the value used.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# RECO_REF_BENCH_THREADS=n pins every pool (BLAS, OpenMP, numba, torch) to n threads before they start.
# With n=1 the comparison is per core and insensitive to other processes on a shared machine, where a
# 2-thread BLAS call waits for both of its threads to be scheduled (measured: a 256×512×512 sgemm took
# 40 ms with 2 threads vs 1.2 ms with 1 while other jobs kept the 2 cores busy).
_THREADS = os.environ.get("RECO_REF_BENCH_THREADS")
if _THREADS:
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = _THREADS

import pytest  # noqa: E402

_FUSION: dict = {"rows": {}, "meta": {}}


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def fusion_results() -> dict:
    """``{"rows": {(suite, impl, B): dict(median_s=…, flops_needed=…, flops_full=…)}, "meta": {…}}``."""
    return _FUSION


def fusion_table(results: dict) -> str:
    """Markdown table of the recorded fusion timings (one block per suite)."""
    rows, meta = results["rows"], results["meta"]
    lines = []
    for suite in sorted({k[0] for k in rows}):
        peak = meta.get(f"{suite}.peak_gflops")
        peak_name = meta.get(f"{suite}.peak_name", "sgemm")
        lines.append(f"**{suite}** — {meta.get(suite + '.desc', '')}")
        if peak:
            lines.append(f"peak = {peak_name}, same run: **{peak:.1f} GFLOP/s**")
        lines.append("")
        lines.append("| B | implementation | median ms | GFLOP/s (needed) | % of peak | GFLOP/s (spec §7 count) "
                     "| × NumPy ref | vs torch (all tokens) | vs torch (row-0) |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for B in sorted({k[2] for k in rows if k[0] == suite}):
            base = rows.get((suite, meta.get(suite + ".baseline", "numpy"), B))
            tfull = rows.get((suite, "torch_full", B))
            trow0 = rows.get((suite, "torch_row0", B))
            for impl in meta.get(suite + ".order", []):
                r = rows.get((suite, impl, B))
                if r is None:
                    continue
                t = r["median_s"]
                gn = r["flops_needed"] / t / 1e9
                gf = r["flops_full"] / t / 1e9
                pct = f"{100 * gn / peak:.0f}%" if peak else "–"
                rel = lambda other: f"{other['median_s'] / t:.2f}×" if other else "–"  # noqa: E731
                lines.append(f"| {B} | {impl} | {1e3 * t:.2f} | {gn:.1f} | {pct} | {gf:.1f} | {rel(base)} "
                             f"| {rel(tfull)} | {rel(trow0)} |")
        lines.append("")
        for key in sorted(k for k in meta if k.startswith(suite + ".env.")):
            lines.append(f"- {key[len(suite) + 5:]}: {meta[key]}")
        lines.append("")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _FUSION["rows"] and not _FUSION.get("extra"):
        return
    # "extra": Markdown blocks other fusion suites add (bench_fusion_query.py: one query, profiles)
    text = "\n".join([fusion_table(_FUSION)] + _FUSION.get("extra", []))
    terminalreporter.write_sep("=", "fusion benchmark table")
    terminalreporter.write_line(text)
    path = os.environ.get("RECO_REF_BENCH_TABLE")
    if path:
        from reco_ref.io import atomic_write_text

        atomic_write_text(path, text + "\n")
        terminalreporter.write_line(f"(written to {path})")
