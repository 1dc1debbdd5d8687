#!/usr/bin/env bash
# Installs the peer frameworks (TensorFlow-CPU + Keras, PyTorch, JAX) into a virtual environment
# for benches/peers/run.py. Idempotent: rerunning only installs what is missing.
#
#   benches/peers/install.sh [VENV_DIR]        (default: benches/peers/.venv)
#   PEERS="torch jax" benches/peers/install.sh (install only some peers: tf, torch, jax)
#
# Each peer is installed on its own, so one that fails (no wheel for this Python, no network)
# does not stop the others; the runner skips peers that are not importable.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/.venv}"
python="${PYTHON:-python3}"
peers="${PEERS:-tf torch jax}"
torch_cpu_index="https://download.pytorch.org/whl/cpu"

say() { printf '[install] %s\n' "$*"; }

if [ ! -x "$venv/bin/python" ]; then
    say "creating virtual environment $venv"
    "$python" -m venv "$venv" || { say "error: '$python -m venv' failed"; exit 1; }
else
    say "using existing virtual environment $venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

has() { "$venv/bin/python" -c "import $1" >/dev/null 2>&1; }

"${pip[@]}" install --quiet --upgrade pip || say "warning: could not upgrade pip (continuing)"
has numpy || "${pip[@]}" install numpy || { say "error: numpy failed to install"; exit 1; }

failed=()
for peer in $peers; do
    case "$peer" in
    tf)
        if has tensorflow && has keras; then say "tensorflow + keras: already installed"; continue; fi
        say "installing tensorflow-cpu + keras"
        "${pip[@]}" install tensorflow-cpu keras || failed+=(tensorflow-cpu)
        ;;
    torch)
        if has torch; then say "torch: already installed"; continue; fi
        # The CPU-only wheels are ~200 MB; PyPI's Linux wheel pulls in the CUDA libraries (GBs).
        if "$venv/bin/python" -c "import urllib.request as u; u.urlopen('$torch_cpu_index/', timeout=10)" >/dev/null 2>&1; then
            say "installing torch (CPU wheels from $torch_cpu_index)"
            "${pip[@]}" install torch --index-url "$torch_cpu_index" || failed+=(torch)
        else
            say "the PyTorch CPU index is not reachable: installing torch from PyPI (with its CUDA libraries; large)"
            "${pip[@]}" install torch || failed+=(torch)
        fi
        ;;
    jax)
        if has jax; then say "jax: already installed"; continue; fi
        say "installing jax (CPU)"
        "${pip[@]}" install jax || failed+=(jax)
        # No optax: jax_peer.py writes its Adam out (a few lines), one dependency fewer.
        ;;
    *) say "unknown peer '$peer' (expected tf, torch or jax)"; failed+=("$peer") ;;
    esac
done

say "installed:"
"$venv/bin/python" - 2>/dev/null <<'EOF'
import importlib
for name in ("numpy", "tensorflow", "keras", "torch", "jax"):
    try:
        print(f"  {name:<11} {importlib.import_module(name).__version__}")
    except Exception as e:  # noqa: BLE001 - report whatever went wrong, keep going
        print(f"  {name:<11} missing ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
EOF
if [ ${#failed[@]} -gt 0 ]; then
    say "failed: ${failed[*]} (the runner will skip them)"
    exit 1
fi
say "done: run  $venv/bin/python $here/run.py"
