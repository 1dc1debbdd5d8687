#!/usr/bin/env python3
"""Wall time to a test accuracy: `cnnc train models/mnist.cnn` against Keras's model.fit of the
same model, side by side, each measuring the test set after every epoch.

    python3 benches/peers/accuracy.py [--threads 2] [--epochs 15] [--target 0.991] [--seeds 42]

For each seed, cnnc trains (`cnnc train --test-every-epoch`) and then Keras (keras_peer.py
--fit), in the other order for every second seed. Both train as the Keras MNIST example does:
batch 128, Adam 1e-3, 15 epochs, a 10% validation split measured after each epoch. The time to
the target is the sum of the epochs' wall times (steps and validation; not the test passes the
measurement adds) up to the first epoch whose test accuracy reaches it; cnnc's JIT compile
(~40 ms) happens before its first epoch and is not in it, Keras's graph building is in its
first epoch. Progress goes to stderr, the table (or with --json every epoch) to stdout.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import run as peers  # the table runner: its paths and helpers

HERE = peers.HERE
ROOT = peers.ROOT


def cnnc_epochs(args, seed):
    """cnnc's epoch records (metrics.jsonl) for one run."""
    with tempfile.TemporaryDirectory(prefix="cnnc-accuracy-") as out:
        cmd = [str(args.cnnc), "train", str(ROOT / "models" / "mnist.cnn"), "--test-every-epoch",
               "--quiet", "--threads", str(args.threads), "--epochs", str(args.epochs),
               "--seed", str(seed), "--out", out]
        peers.log(" ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            raise RuntimeError(f"cnnc train failed: {done.stderr.strip()[-500:]}")
        lines = [json.loads(l) for l in Path(out, "metrics.jsonl").read_text().splitlines()]
    return [dict(l, system="cnnc") for l in lines if "epoch" in l]


def keras_epochs(args, seed):
    """Keras's epoch lines for one run."""
    cmd = [str(args.python), str(HERE / "keras_peer.py"), "--fit", "--threads", str(args.threads),
           "--epochs", str(args.epochs), "--seed", str(seed)]
    peers.log(" ".join(cmd))
    env = {**os.environ, "CNNC": str(args.cnnc)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"keras_peer.py --fit failed: {done.stderr.strip()[-500:]}")
    return [json.loads(l) for l in done.stdout.splitlines() if l.startswith("{")]


def time_to(epochs, target):
    """(epoch, seconds) at the first epoch whose test accuracy reaches target, else None."""
    total = 0.0
    for e in epochs:
        total += e["seconds"]
        if e["test_accuracy"] >= target:
            return e["epoch"], total
    return None


def table(args, runs):
    lines = [
        f"{datetime.date.today()}, {peers.cpu_model()}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads; models/mnist.cnn, {args.epochs} epochs, target "
        f"{100 * args.target:.1f}% test accuracy.",
        "",
        "| system | seed | reached at epoch | wall s to it | best test accuracy (epoch) "
        "| final | all epochs s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (system, seed), epochs in runs.items():
        reached = time_to(epochs, args.target)
        best = max(epochs, key=lambda e: e["test_accuracy"])
        at, seconds = (f"{reached[0]}", f"{reached[1]:.1f}") if reached else ("not reached", "–")
        lines.append(
            f"| {system} | {seed} | {at} | {seconds} | {100 * best['test_accuracy']:.2f}% "
            f"({best['epoch']}) | {100 * epochs[-1]['test_accuracy']:.2f}% "
            f"| {sum(e['seconds'] for e in epochs):.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--target", type=float, default=0.991, help="test accuracy, a fraction")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--cnnc", type=Path,
                   default=Path(os.environ.get("CNNC", ROOT / "target" / "release" / "cnnc")))
    p.add_argument("--python", type=Path, default=HERE / ".venv" / "bin" / "python",
                   help="the virtual environment's Python, with Keras (install.sh)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a run may take")
    p.add_argument("--json", action="store_true", help="print every epoch as JSON instead")
    args = p.parse_args()
    if not args.cnnc.exists():
        sys.exit(f"error: {args.cnnc} not found (cargo build --release)")
    why = peers.available(str(args.python), ["tensorflow", "keras"])
    if why:
        sys.exit(f"error: Keras is not available: {why}")

    runs = {}
    for i, seed in enumerate(args.seeds):
        order = [("cnnc", cnnc_epochs), ("Keras", keras_epochs)]
        for system, fn in order if i % 2 == 0 else order[::-1]:
            runs[(system, seed)] = fn(args, seed)
            peers.log(system, seed, [round(e["test_accuracy"], 4) for e in runs[(system, seed)]])
    if args.json:
        for (system, seed), epochs in runs.items():
            for e in epochs:
                print(json.dumps(dict(e, system=system, seed=seed)))
    else:
        print(table(args, dict(sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0] != "cnnc")))))


if __name__ == "__main__":
    main()
