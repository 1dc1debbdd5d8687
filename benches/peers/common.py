"""What the peer scripts share: flags, MNIST from cnnc's cache, timing and the JSON line.

Every peer times the same way as `cnnc bench`: untimed warm-up steps (the first one traces and
compiles where the framework does), then N steps timed one by one, each ending with the result
on the host, and reports batch / median step time. The batches are real MNIST images, turned
into the framework's tensors before timing, so loading and conversion are not timed.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODELS = ("mnist", "mnist_bn")
CLASSES = 10


def parse_args(description, extra=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", choices=MODELS, default="mnist",
                   help="mnist: models/mnist.cnn; mnist_bn: models/mnist_bn.cnn")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--inference-batch-size", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps of each kind first")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--inference-steps", type=int, default=10, help="timed inference batches")
    p.add_argument("--data", type=Path, help="directory with the MNIST IDX files "
                   "[default: <cnnc data dir>/mnist]")
    if extra:
        extra(p)
    args = p.parse_args()
    if min(args.threads, args.batch_size, args.inference_batch_size, args.steps,
           args.inference_steps) < 1 or args.warmup < 1:
        p.error("threads, batch sizes, steps and warm-up must be at least 1")
    return args


def pin_cpus(threads):
    """Restricts this process to `threads` CPUs (as `taskset` would), for frameworks whose thread
    pools cannot be sized otherwise. A no-op when there are no more CPUs than that."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])


def data_dir(explicit=None):
    """cnnc's MNIST directory: --data, $CNNC_DATA/mnist, `cnnc data dir`/mnist, or the default."""
    if explicit:
        return explicit
    if os.environ.get("CNNC_DATA"):
        return Path(os.environ["CNNC_DATA"]) / "mnist"
    cnnc = os.environ.get("CNNC") or shutil.which("cnnc")
    repo_cnnc = Path(__file__).resolve().parents[2] / "target" / "release" / "cnnc"
    for exe in (cnnc, repo_cnnc):
        if exe and Path(exe).exists():
            out = subprocess.run([str(exe), "data", "dir"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                return Path(out.stdout.strip()) / "mnist"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "cnnc" / "mnist"


def read_idx(path):
    """An IDX file (plain or .gz) as a uint8 array of its shape."""
    if not path.exists() and path.with_name(path.name + ".gz").exists():
        import gzip
        raw = gzip.decompress(path.with_name(path.name + ".gz").read_bytes())
    else:
        raw = path.read_bytes()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def mnist_batches(args):
    """Training batches (NHWC float32 in [0, 1], one-hot float32 labels) for the warm-up and timed
    steps, cycling through the training set, and one inference batch from the test set."""
    d = data_dir(args.data)
    try:
        images = read_idx(d / "train-images-idx3-ubyte")
        labels = read_idx(d / "train-labels-idx1-ubyte")
        test = read_idx(d / "t10k-images-idx3-ubyte")
    except FileNotFoundError as e:
        sys.exit(f"error: MNIST not found ({e}); run `cnnc data fetch mnist` or pass --data DIR")
    eye = np.eye(CLASSES, dtype=np.float32)
    n = len(images) // args.batch_size
    batches = []
    for i in range(min(args.warmup + args.steps, n)):
        s = slice(i * args.batch_size, (i + 1) * args.batch_size)
        x = (images[s].astype(np.float32) / 255.0)[..., None]
        batches.append((x, eye[labels[s]]))
    reps = -(-args.inference_batch_size // len(test))
    infer = (np.concatenate([test] * reps)[:args.inference_batch_size].astype(np.float32) / 255.0)
    return batches, infer[..., None]


def mnist_arrays(args):
    """The whole of MNIST as float32 NHWC images in [0, 1] and one-hot labels:
    (train images, train labels, test images, test labels)."""
    d = data_dir(args.data)
    try:
        parts = [read_idx(d / name) for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    except FileNotFoundError as e:
        sys.exit(f"error: MNIST not found ({e}); run `cnnc data fetch mnist` or pass --data DIR")
    eye = np.eye(CLASSES, dtype=np.float32)
    images = [(x.astype(np.float32) / 255.0)[..., None] for x in (parts[0], parts[2])]
    return images[0], eye[parts[1]], images[1], eye[parts[3]]


def timed(fn, count):
    """The wall times of `count` calls of fn, which must return only when its work is done."""
    times = []
    for i in range(count):
        started = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - started)
    return times


def bench(args, system, train_step, infer_step, n_batches):
    """Runs warm-up and timed training steps (train_step(i) runs on batch i mod n_batches), then
    inference batches, and prints the result line. compile_s is the wall time of the first
    training step and the first inference batch: tracing and compilation where the framework
    does them, else the first call's overhead."""
    first_train = timed(lambda i: train_step(i % n_batches), 1)[0]
    timed(lambda i: train_step((i + 1) % n_batches), args.warmup - 1)
    train = timed(lambda i: train_step((args.warmup + i) % n_batches), args.steps)
    first_infer = timed(infer_step, 1)[0]
    timed(infer_step, args.warmup - 1)
    infer = timed(infer_step, args.inference_steps)
    result = {
        "system": system,
        "model": args.model,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "train_img_s": round(args.batch_size / statistics.median(train), 1),
        "inference_img_s": round(args.inference_batch_size / statistics.median(infer), 1),
        "inference_batch_size": args.inference_batch_size,
        "compile_s": round(first_train + first_infer, 3),
    }
    print(json.dumps(result), flush=True)
    return result
