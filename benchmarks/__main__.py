"""``python -m benchmarks [--quick] [-k NAME] [--repeats N] [--sequential] [--json PATH]
[--compare PATH] [--strict]``: run every benchmark module, print one table and a summary
of the targets, write the results as JSON (``benchmarks/results/latest.json`` by default).

- ``-k NAME`` (repeatable): only the modules whose name contains ``NAME``
  (``-k stack -k concurrency``).
- ``--repeats N``: repeats per case (7 by default, 3 with ``--quick``); figures are medians.
- ``--sequential``: measure each case's repeats back to back; by default the cases of a
  group are measured in rounds, one repeat each per round, so that load from other
  processes weighs on ours and the anchor alike.
- ``--compare PATH``: a JSON file of an earlier run; each row shows the change against it.
- ``--strict``: exit with status 1 when a target is missed or a count check fails (the
  default is 0 whatever the figures: they are noisy on a shared machine). A module that
  crashes always gives status 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks._harness import Case, Result, result_row, run_cases

HERE = Path(__file__).parent


def _module_names(selected: list[str]) -> list[str]:
    names = sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))
    if selected:
        names = [n for n in names if any(s in n for s in selected)]
    return names


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def _change(new: float, old: float | None) -> str:
    if old is None or old == 0:
        return "-"
    return f"{(new - old) / abs(old) * 100:+.0f}%"


def _load(path: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def _index_previous(
    previous: dict[str, Any] | None,
) -> tuple[dict[tuple[str, str, int], dict[str, Any]], dict[tuple[str, str], dict[str, Any]]]:
    if previous is None:
        return {}, {}
    cases = {(r["group"], r["name"], r["threads"]): r for r in previous.get("cases", [])}
    results = {(r["group"], r["name"]): r for r in previous.get("results", [])}
    return cases, results


def _print_cases(rows: list[dict[str, Any]], previous: dict[tuple[str, str, int], Any]) -> None:
    compare = bool(previous)
    header = (
        f"{'group':<22}{'case':<30}{'thr':>4}{'ns/call':>10}{'spread':>8}{'overhead':>10}  "
        f"{'vs anchor':<24}{'ratio':>7}{'target':>8}  ok"
    )
    if compare:
        header += f"  {'was ns':>9}{'Δns':>6}{'was ratio':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        spread = (r["ns_max"] - r["ns_min"]) / r["ns_per_call"] * 100 if r["ns_per_call"] else 0
        ok = _fmt(r["ok"])
        if r.get("check") not in (None, "ok"):
            ok += " (check failed)"
        line = (
            f"{r['group']:<22}{r['name']:<30}{r['threads']:>4}{r['ns_per_call']:>10.0f}"
            f"{f'±{spread / 2:.0f}%':>8}{r['overhead_ns']:>10.0f}  {r['anchor'] or '':<24}"
            f"{_fmt(r['ratio'], '.3f'):>7}{_fmt(r['target'], '.2f'):>8}  {ok}"
        )
        if compare:
            old = previous.get((r["group"], r["name"], r["threads"]))
            old_ns = old["ns_per_call"] if old else None
            old_ratio = old.get("ratio") if old else None
            line += (
                f"  {_fmt(old_ns, '.0f'):>9}{_change(r['ns_per_call'], old_ns):>6}"
                f"{_fmt(old_ratio, '.3f'):>10}"
            )
        print(line)


def _print_results(rows: list[dict[str, Any]], previous: dict[tuple[str, str], Any]) -> None:
    compare = bool(previous)
    header = f"{'group':<22}{'figure':<52}{'value':>14} {'unit':<14}{'target':>10}  ok"
    if compare:
        header += f"  {'was':>12}{'Δ':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        direction = ">=" if r["higher_is_better"] else "<="
        target = f"{direction}{r['target']:g}" if r["target"] is not None else "-"
        line = (
            f"{r['group']:<22}{r['name']:<52}{r['value']:>14.3f} {r['unit']:<14}"
            f"{target:>10}  {_fmt(r['ok'])}"
        )
        if compare:
            old = previous.get((r["group"], r["name"]))
            old_value = old["value"] if old else None
            line += f"  {_fmt(old_value, '.3f'):>12}{_change(r['value'], old_value):>6}"
        print(line)


def _summary(case_rows: list[dict[str, Any]], other_rows: list[dict[str, Any]]) -> list[str]:
    """Print which targets were met; return the descriptions of those missed."""
    met: list[str] = []
    missed: list[str] = []
    for r in case_rows:
        label = f"{r['group']} / {r['name']} ({r['threads']} thr)"
        if r.get("check") not in (None, "ok"):
            missed.append(f"{label}: count check failed: {r['check']}")
        elif r["ok"] is True:
            met.append(label)
        elif r["ok"] is False:
            missed.append(f"{label}: ratio {r['ratio']:.3f} > target {r['target']:g}")
    for r in other_rows:
        label = f"{r['group']} / {r['name']}"
        direction = ">=" if r["higher_is_better"] else "<="
        if r["ok"] is True:
            met.append(label)
        elif r["ok"] is False:
            missed.append(f"{label}: {r['value']:g} {r['unit']}, target {direction}{r['target']:g}")
    print(f"\ntargets: {len(met)} met, {len(missed)} not met")
    for line in missed:
        print(f"  NOT MET  {line}")
    return missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    parser.add_argument(
        "-k", action="append", default=[], metavar="NAME", help="only modules matching NAME"
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats per case (median)")
    parser.add_argument("--json", default=str(HERE / "results" / "latest.json"), metavar="PATH")
    parser.add_argument("--compare", default=None, metavar="PATH", help="an earlier run's JSON")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a target is missed or a check fails"
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="measure each case's repeats back to back instead of in rounds",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    previous = _load(args.compare) if args.compare else None
    names = _module_names(args.k)
    if not names:
        print(f"no benchmark module matches {args.k}", file=sys.stderr)
        return 2

    load_before = os.getloadavg()
    started = time.perf_counter()
    case_rows: list[dict[str, Any]] = []
    other_rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            if hasattr(module, "cases"):
                cases: list[Case] = module.cases()
                case_rows.extend(
                    run_cases(
                        cases,
                        quick=args.quick,
                        repeats=args.repeats,
                        interleave=not args.sequential,
                    )
                )
            if hasattr(module, "results"):
                results: list[Result] = module.results(args.quick)
                other_rows.extend(result_row(r) for r in results)
        except Exception as exc:  # one broken module must not hide the others' figures
            traceback.print_exc()
            errors.append({"module": name, "error": f"{type(exc).__name__}: {exc}"})

    previous_cases, previous_results = _index_previous(previous)
    if case_rows:
        _print_cases(case_rows, previous_cases)
    if other_rows:
        print()
        _print_results(other_rows, previous_results)
    missed = _summary(case_rows, other_rows)
    for error in errors:
        print(f"  ERROR    {error['module']}: {error['error']}")
    load_after = os.getloadavg()
    print(
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        f"({os.cpu_count()} CPUs); {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )

    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": {"before": load_before, "after": load_after},
        "argv": sys.argv[1:] if argv is None else argv,
        "quick": args.quick,
        "repeats": args.repeats,
        "interleaved": not args.sequential,
        "modules": names,
        "cases": case_rows,
        "results": other_rows,
        "missed": missed,
        "errors": errors,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"written {path}", file=sys.stderr)
    if errors:
        return 1
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
