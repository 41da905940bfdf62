"""Collect the wheels dksgraph needs besides PyTorch, for installing it on a machine without internet.

    python tools/wheels.py                    # into wheels/, for CPython 3.10-3.13 on x86_64 Linux
    python tools/wheels.py --python 3.12      # one server's Python only (make wheels PY_VERSION=3.12)
    python tools/wheels.py --python 3.12 --arch aarch64 --dest /mnt/usb/wheels
    python tools/wheels.py --print-requirements   # what the GPU check installs from wheels/, one per line

GPU servers often have PyTorch, torchvision and timm but no network. This downloads every other
runtime dependency of pyproject.toml, the test runner and the build backend (the requirements are
read from pyproject.toml, so the list never drifts) as binary wheels for each target Python; on the
server, ``tools/gpu_check.sh`` installs these requirements with ``pip install --no-index --find-links
wheels`` and then dksgraph from the checkout with ``--no-deps``, so that pip never re-resolves the pins of
the server's own PyTorch build. ``make wheels`` runs this.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# large, and already beside PyTorch on GPU servers
BRING_YOUR_OWN = {"torch", "torchvision", "numpy", "timm", "matplotlib", "onnx", "onnxscript", "onnxruntime"}


def _array(text: str, key: str) -> list[str]:
    match = re.search(rf"^{re.escape(key)}\s*=\s*\[(.*?)\]", text, re.S | re.M)
    return re.findall(r'"([^"]+)"', match.group(1)) if match else []


def requirements(build: bool = True) -> list[str]:
    """pyproject.toml's runtime dependencies, its `test` extra and (with `build`) its build requirements,
    less BRING_YOUR_OWN."""
    text = (ROOT / "pyproject.toml").read_text()
    wanted = _array(text, "dependencies") + _array(text, "test") + (_array(text, "requires") if build else [])
    name = re.compile(r"^[A-Za-z0-9_.-]+")
    return sorted({r for r in wanted if name.match(r).group(0).lower() not in BRING_YOUR_OWN})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=str(ROOT / "wheels"))
    parser.add_argument("--python", nargs="+", default=["3.10", "3.11", "3.12", "3.13"],
                        help="target Python versions (the server's `python3 --version`)")
    parser.add_argument("--arch", default="x86_64", help="x86_64 or aarch64")
    parser.add_argument("--print-requirements", action="store_true",
                        help="print the runtime and test requirements to install from the wheels, and exit")
    args = parser.parse_args()
    if args.print_requirements:
        print("\n".join(requirements(build=False)))
        return
    reqs = requirements()
    platforms = [f"manylinux_2_17_{args.arch}", f"manylinux2014_{args.arch}", f"manylinux_2_28_{args.arch}"]
    for version in args.python:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--python-version", version, "--dest", args.dest,
               *[a for p in platforms for a in ("--platform", p)], *reqs]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if not line.startswith("WARNING: Location")]
            sys.exit(f"pip download for Python {version} failed:\n" + "\n".join(errors[-15:]))
    wheels = sorted(Path(args.dest).glob("*.whl"))
    print(f"{len(wheels)} wheels for Python {', '.join(args.python)} ({args.arch}) in {args.dest}: "
          f"{', '.join(reqs)}")


if __name__ == "__main__":
    main()
