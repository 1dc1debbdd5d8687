#!/usr/bin/env python3
"""Runs `cnnc bench` and the peer frameworks side by side on models/mnist.cnn and
models/mnist_bn.cnn and prints a Markdown table of medians with cnnc's ratio to each peer.

    python3 benches/peers/run.py [--threads 2] [--rounds 3] [--peers keras torch jax] [--json]

Each round runs, for each model, cnnc and then every peer (in the reverse order on odd rounds,
so that a drift in the machine's load does not always favour the same side). Peers run in the
virtual environment that install.sh made; one whose framework is not installed there is skipped
with a note. Progress goes to stderr, the table (or with --json the raw results) to stdout.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MODELS = ("mnist", "mnist_bn")
# name: (script, extra flags, modules it needs)
PEERS = {
    "keras": ("keras_peer.py", [], ["tensorflow", "keras"]),
    "torch": ("torch_peer.py", [], ["torch"]),
    "torch-compile": ("torch_peer.py", ["--compile"], ["torch"]),
    "jax": ("jax_peer.py", [], ["jax"]),
}
METRICS = (("train_img_s", "mnist", "train img/s"), ("train_img_s", "mnist_bn", "train img/s (BN)"),
           ("inference_img_s", "mnist", "inference img/s"),
           ("inference_img_s", "mnist_bn", "inference img/s (BN)"))


def log(*parts):
    print("[peers]", *parts, file=sys.stderr, flush=True)


def cpu_model():
    """The CPU's name, with its family and model and its widest vectors where /proc/cpuinfo
    tells them: "AMD EPYC" names Zen 4 (family 25) and Zen 5 (family 26) alike, and Zen 5
    runs AVX-512 at twice Zen 4's width, which the peers use and cnnc (128-bit) does not."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        name = fields.get("model name", platform.processor() or "unknown CPU")
        flags = set(fields.get("flags", "").split())
        widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
        details = [f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else None, widest]
        details = [d for d in details if d]
        return f"{name} ({', '.join(details)})" if details else name
    except OSError:
        return platform.processor() or "unknown CPU"


def available(python, modules):
    """None when `python` can import all of modules, else why not."""
    if not Path(python).exists():
        return f"{python} not found (run benches/peers/install.sh)"
    code = "import " + ", ".join(modules)
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"{' + '.join(modules)} not importable ({last})"
    return None


def run_json(cmd, timeout, env=None):
    """The last JSON object a command printed, or None (logged) when it failed."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        log(f"timed out after {timeout} s: {' '.join(cmd)}")
        return None
    text = out.stdout
    start = text.rfind("\n{") + 1  # the last object that starts a line (cnnc's is indented)
    try:
        if out.returncode != 0:
            raise ValueError(f"exit {out.returncode}")
        return json.loads(text[start:])
    except ValueError as e:
        tail = "\n  ".join(out.stderr.strip().splitlines()[-5:])
        log(f"failed ({e}): {' '.join(cmd)}\n  {tail}")
        return None


def run_cnnc(args, model):
    cmd = [str(args.cnnc), "bench", str(ROOT / "models" / f"{model}.cnn"), "--json",
           "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--inference-batch-size", str(args.inference_batch_size),
           "--rounds", str(args.steps)]
    r = run_json(cmd, args.timeout)
    if r is None:
        return None
    return {"system": "cnnc", "model": model, "threads": r["threads"],
            "batch_size": r["batch_size"], "train_img_s": r["train"]["fused_img_s"],
            "inference_img_s": r["inference"]["fused_img_s"],
            "inference_batch_size": r["inference_batch_size"],
            "compile_s": r.get("compile_ms", {}).get("fused", float("nan")) / 1e3}


def run_peer(args, peer, model):
    script, flags, _ = PEERS[peer]
    cmd = [args.python, str(HERE / script), "--model", model, "--threads", str(args.threads),
           "--batch-size", str(args.batch_size),
           "--inference-batch-size", str(args.inference_batch_size),
           "--steps", str(args.steps), *flags]
    # CNNC: the peers ask this binary for the data directory (`cnnc data dir`).
    return run_json(cmd, args.timeout, env={**os.environ, "CNNC": str(args.cnnc)})


def fmt(x, spec=",.0f"):
    return format(x, spec) if x == x else "–"  # NaN (no measurement) as a dash


def round_ratios(runs, cnnc, peers, median):
    """A line per metric: cnnc's throughput over the best peer's (by median) in each round
    that measured both."""
    if not cnnc or not peers:
        return []
    lines = []
    for key, model, title in METRICS:
        medians = {peer: median(peer, model, key) for peer in peers}
        medians = {peer: m for peer, m in medians.items() if m == m}
        if not medians:
            continue
        best = max(medians, key=medians.get)
        def by_round(system):
            return {r["round"]: r[key] for r in runs if r["system"] == system and r["model"] == model}
        ours, theirs = by_round(cnnc), by_round(best)
        ratios = [ours[i] / theirs[i] for i in sorted(ours) if i in theirs and theirs[i] > 0]
        if ratios:
            lines.append(f"- {title}, against {best}: " + ", ".join(f"{r:.2f}x" for r in ratios)
                         + f" (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    return lines


def table(args, runs, skipped):
    """Markdown: a row per system, medians over the rounds; peers' cells carry cnnc's ratio."""
    def median(system, model, key):
        xs = [r[key] for r in runs if r["system"] == system and r["model"] == model]
        return statistics.median(xs) if xs else float("nan")

    systems = list(dict.fromkeys(r["system"] for r in runs if r["key"] == "cnnc"))
    systems += list(dict.fromkeys(r["system"] for r in runs if r["key"] != "cnnc"))
    cnnc = next((s for s in systems if s == "cnnc"), None)
    lines = [
        f"Measured {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} on {cpu_model()} "
        f"({os.cpu_count()} CPUs), {args.threads} threads, training batch {args.batch_size}, "
        f"inference batch {args.inference_batch_size}; medians of {args.rounds} round(s) of "
        f"{args.steps} timed steps each. (×r): cnnc's throughput / that system's.",
        "",
        "| system | " + " | ".join(title for _, _, title in METRICS) + " | compile s (mnist / BN) |",
        "|---|" + "---:|" * (len(METRICS) + 1),
    ]
    for system in systems:
        cells = []
        for key, model, _ in METRICS:
            value = median(system, model, key)
            cell = fmt(value)
            if cnnc and system != cnnc and value == value:
                ratio = median(cnnc, model, key) / value
                cell += f" (×{ratio:.2f})" if ratio == ratio else ""
            cells.append(cell)
        compile_s = " / ".join(fmt(median(system, m, "compile_s"), ".3g") for m in MODELS)
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {compile_s} |")
    lines.append("\ncompile s: cnnc's JIT compile time of the fused programs; for the peers the "
                 "wall time of the first training step plus the first inference batch.")
    rounds = round_ratios(runs, cnnc, [s for s in systems if s != cnnc], median)
    if rounds:
        lines += ["", "Round by round, cnnc / the column's best peer (by median): the spread that "
                  "the machine's load puts on each ratio.", "", *rounds]
    if skipped:
        lines += ["", "Skipped:", *(f"- {note}" for note in skipped)]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3, help="runs of every system on every model")
    p.add_argument("--steps", type=int, default=20, help="timed steps in each run")
    p.add_argument("--pause", type=float, default=10.0,
                   help="seconds of idle machine before each run: right after a TensorFlow run, "
                        "cnnc measured 2,713 img/s against 4,500 rested (a 2-core cloud machine)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--inference-batch-size", type=int, default=1000)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--peers", nargs="+", choices=list(PEERS), default=["keras", "torch", "jax"],
                   help="torch-compile is left out by default (slow to compile)")
    p.add_argument("--cnnc", type=Path,
                   default=Path(os.environ.get("CNNC", ROOT / "target" / "release" / "cnnc")))
    p.add_argument("--python", default=str(HERE / ".venv" / "bin" / "python"),
                   help="the peers' interpreter [default: benches/peers/.venv/bin/python]")
    p.add_argument("--timeout", type=int, default=900, help="seconds for one run")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = p.parse_args()
    if min(args.threads, args.rounds, args.steps) < 1:
        p.error("--threads, --rounds and --steps must be at least 1")

    skipped, systems = [], []
    if args.cnnc.exists():
        systems.append("cnnc")
    else:
        skipped.append(f"cnnc: {args.cnnc} not found (cargo build --release)")
    for peer in args.peers:
        why = available(args.python, PEERS[peer][2])
        if why:
            skipped.append(f"{peer}: {why}")
        else:
            systems.append(peer)
    for note in skipped:
        log("skipping", note)

    runs = []
    for rnd in range(args.rounds):
        for model in args.models:
            for key in systems if rnd % 2 == 0 else systems[::-1]:
                log(f"round {rnd + 1}/{args.rounds} {model}: {key}")
                time.sleep(args.pause)
                r = run_cnnc(args, model) if key == "cnnc" else run_peer(args, key, model)
                if r is not None:
                    runs.append({**r, "key": key, "round": rnd + 1})
                    log(f"  train {r['train_img_s']:,.0f} img/s, "
                        f"inference {r['inference_img_s']:,.0f} img/s")

    if args.json:
        meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads,
                "rounds": args.rounds, "steps": args.steps, "skipped": skipped}
        print(json.dumps({"meta": meta, "runs": runs}, indent=1))
    else:
        print(table(args, runs, skipped))


if __name__ == "__main__":
    main()
