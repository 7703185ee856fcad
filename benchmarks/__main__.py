"""``python -m benchmarks [--quick] [-k GROUP] [--json PATH]``: run every benchmark module,
print one table, write the results as JSON (``benchmarks/results/latest.json``)."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import Case, Result, result_row, run_cases

HERE = Path(__file__).parent


def _modules(selected: list[str]) -> list[Any]:
    names = sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))
    if selected:
        names = [n for n in names if any(s in n for s in selected)]
    return [importlib.import_module(f"benchmarks.{n}") for n in names]


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    parser.add_argument("-k", action="append", default=[], help="only modules matching")
    parser.add_argument("--json", default=str(HERE / "results" / "latest.json"))
    args = parser.parse_args(argv)

    case_rows: list[dict[str, Any]] = []
    other_rows: list[dict[str, Any]] = []
    for module in _modules(args.k):
        print(f"running {module.__name__} ...", file=sys.stderr, flush=True)
        if hasattr(module, "cases"):
            cases: list[Case] = module.cases()
            case_rows.extend(run_cases(cases, quick=args.quick))
        if hasattr(module, "results"):
            results: list[Result] = module.results(args.quick)
            other_rows.extend(result_row(r) for r in results)

    header = f"{'group':<22}{'case':<28}{'thr':>4}{'ns/call':>11}{'overhead':>11}  {'vs anchor':<22}{'ratio':>7}{'target':>8}  ok"
    print(header)
    print("-" * len(header))
    for r in case_rows:
        vs = r["anchor"] or ""
        print(
            f"{r['group']:<22}{r['name']:<28}{r['threads']:>4}{r['ns_per_call']:>11.0f}"
            f"{r['overhead_ns']:>11.0f}  {vs:<22}{_fmt(r['ratio'], '.3f'):>7}"
            f"{_fmt(r['target'], '.2f'):>8}  {_fmt(r['ok'])}"
        )
    if other_rows:
        print()
        print(f"{'group':<22}{'figure':<40}{'value':>14} {'unit':<10}{'target':>10}  ok")
        print("-" * 100)
        for r in other_rows:
            direction = ">=" if r["higher_is_better"] else "<="
            target = f"{direction}{r['target']:g}" if r["target"] is not None else "-"
            print(
                f"{r['group']:<22}{r['name']:<40}{r['value']:>14.3f} {r['unit']:<10}"
                f"{target:>10}  {_fmt(r['ok'])}"
            )
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "quick": args.quick,
        "cases": case_rows,
        "results": other_rows,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
