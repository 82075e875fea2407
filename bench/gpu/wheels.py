"""`make gpu-wheels`: the wheels bench/gpu/run.sh installs on a GPU machine without network, into
bench/gpu/wheels (ignored by git; carry it to the machine with the working tree).

The required ones are bench/gpu/requirements.txt; then, in this order, each optional one that keeps
the folder within the carry's 64 MiB: Liger's kernels (both trainers use them where installed),
bitsandbytes (QLoRA; without it run.sh skips QLoRA, saying why). MANIFEST.txt in the folder lists
what is there and what was left out and why; run.sh prints it.

    python bench/gpu/wheels.py [--budget-mib 64]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEELS = HERE / "wheels"
OPTIONAL = (("liger-kernel==0.8.5", "Liger's kernels"), ("bitsandbytes==0.50.2", "QLoRA"))
MIB = 2**20
# The GPU machine's Python: CPython 3.11 (ftpipe's), Linux x86_64; binary wheels only, each alone
# (their dependencies are in the list or on the machine). pip takes the platform tags as given, so
# each manylinux level the wheels use is named.
TARGET = ["--only-binary=:all:", "--no-deps", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
          *(f"--platform={tag}_x86_64" for tag in ("manylinux_2_28", "manylinux_2_24", "manylinux_2_17",
                                                   "manylinux2014"))]


def download(requirements: list[str], into: Path) -> list[Path]:
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", str(into),
                    *TARGET, *requirements], check=True)
    return sorted(into.glob("*.whl"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mib", type=float, default=64.0, help="what may be carried to the GPU machine")
    args = ap.parse_args()
    budget = args.budget_mib * MIB
    shutil.rmtree(WHEELS, ignore_errors=True)   # nothing stale counted or installed
    required = [line.split("#")[0].strip() for line in (HERE / "requirements.txt").read_text().splitlines()]
    wheels = download([r for r in required if r], WHEELS)
    lines = [f"{w.name}  {w.stat().st_size / MIB:.1f} MiB" for w in wheels]
    total = sum(w.stat().st_size for w in wheels)
    if total > budget:
        print(f"the required wheels alone take {total / MIB:.1f} MiB, over the {args.budget_mib:g} MiB carry",
              file=sys.stderr)
        return 1
    for requirement, purpose in OPTIONAL:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                (wheel,) = download([requirement], Path(tmp))
            except subprocess.CalledProcessError:
                lines.append(f"left out: {requirement} (for {purpose}): pip could not download it (above)")
                continue
            size = wheel.stat().st_size
            if total + size <= budget:
                shutil.move(wheel, WHEELS / wheel.name)
                total += size
                lines.append(f"{wheel.name}  {size / MIB:.1f} MiB  ({purpose})")
            else:
                lines.append(f"left out: {requirement} ({size / MIB:.1f} MiB, for {purpose}): with it the carry "
                             f"would be {(total + size) / MIB:.1f} MiB, over {args.budget_mib:g} MiB")
    header = (f"# bench/gpu/wheels, made by `make gpu-wheels` on {date.today().isoformat()}: {total / MIB:.1f} MiB "
              f"of a {args.budget_mib:g} MiB carry (CPython 3.11, manylinux x86_64)")
    (WHEELS / "MANIFEST.txt").write_text("\n".join([header, *lines]) + "\n")
    print("\n".join([header, *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
