"""One runner for every benchmark: `python benchmarks/run.py [--only NAME ...] [--quick] --out DIR`.

Each `benchmarks/bench_<name>.py` defines `run(quick: bool) -> list[dict]`: one dict a row, with at least
`benchmark`, `case`, and measured figures (units in the key names, e.g. `events_per_s`, `peak_rss_mb`).
Rows are written to `DIR/<name>.json`, and all rows to `DIR/results.json` and `DIR/results.md`.
Compare figures only as ratios measured in the same run: the machines are noisy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def fmt(value) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return f"{value:.3e}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """One table per benchmark, columns = union of keys in first-seen order."""
    out = []
    by_bench: dict[str, list[dict]] = {}
    for r in rows:
        by_bench.setdefault(r["benchmark"], []).append(r)
    for bench, rs in by_bench.items():
        cols: list[str] = []
        for r in rs:
            cols += [k for k in r if k != "benchmark" and k not in cols]
        out.append(f"### {bench}\n")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in rs:
            out.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--only", nargs="*", help="benchmark names (file bench_NAME.py)")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the runner works")
    parser.add_argument("--collect", action="store_true", help="rebuild results.md/json from DIR/*.json only")
    args = parser.parse_args(argv)

    found = discover()
    names = [] if args.collect else args.only or list(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; have {list(found)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_rows: list[dict] = []
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        rows = load(found[name]).run(quick=args.quick)
        for r in rows:
            r.setdefault("benchmark", name)
            print("  ", {k: fmt(v) for k, v in r.items() if k != "benchmark"}, flush=True)
        (out / f"{name}.json").write_text(json.dumps(rows, indent=2, default=str))
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
        all_rows += rows
    # Merge with earlier results of benchmarks not rerun, so the table stays whole.
    merged = []
    for name in found:
        if name in names:
            merged += [r for r in all_rows if r["benchmark"] == name]
        elif (out / f"{name}.json").is_file():
            merged += json.loads((out / f"{name}.json").read_text())
    meta = {"machine": platform.platform(), "python": platform.python_version(), "quick": args.quick}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": merged}, indent=2, default=str))
    (out / "results.md").write_text(f"# mmehr benchmarks\n\n{meta}\n\n" + markdown_table(merged))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
