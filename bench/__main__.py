"""Run the benchmarks, print a table and write bench-results.json."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import signal
import sys

import bench


def load_modules() -> None:
    """Import every ``bench/bench_*.py`` module so they register their benchmarks."""
    for module in pkgutil.iter_modules(bench.__path__):
        if module.name.startswith("bench_"):
            importlib.import_module(f"bench.{module.name}")


def main() -> int:
    # SIGTERM ends the run like Ctrl-C, so that every broker and daemon started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--only", default="", help="run benchmarks whose name starts with this")
    parser.add_argument("--out", default="bench-results.json")
    args = parser.parse_args()
    load_modules()
    funcs = []
    for name, func in bench.REGISTRY.items():
        if name.startswith(args.only) and func not in funcs:
            funcs.append(func)
    if not funcs:
        print(f"no benchmark name starts with {args.only!r}; known: {sorted(bench.REGISTRY)}",
              file=sys.stderr)
        return 1
    results = []
    for func in funcs:
        for result in func():
            if result.name.startswith(args.only):
                results.append(result)
                print(f"  {result.name}: {result.value:g} {result.unit}", file=sys.stderr)
    rows = [r.as_dict() for r in results]
    if not rows:
        print("no benchmark produced a result", file=sys.stderr)
        return 1
    with open(args.out, "w") as out:
        json.dump(rows, out, indent=2)
    width = max(len(r["name"]) for r in rows)
    bwidth = max(len(r["baseline_name"]) for r in rows)
    print(f"{'name':<{width}}  {'value':>12} {'unit':<8} {'baseline':<{bwidth}}  "
          f"{'baseline':>12}  ratio")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['value']:>12.4g} {r['unit']:<8} "
              f"{r['baseline_name']:<{bwidth}}  {r['baseline_value']:>12.4g}  {r['ratio']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
