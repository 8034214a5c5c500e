"""End-to-end wall time and peak RSS of the default ``fcmoe run`` (what ``make run`` runs after its set-up).

Usage: ``python bench/end_to_end.py [-- extra fcmoe run arguments]``. The run is a child process, so its peak
resident memory is the kernel's ``ru_maxrss`` of the children; targets from DESIGN: under 15 minutes for
``make run`` (this figure plus the install and asset download).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        command = [str(Path(sys.executable).with_name("fcmoe")), "run", "--quiet", "--out", out, *sys.argv[1:]]
        started = time.perf_counter()
        done = subprocess.run(command, check=False)
        wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB → GiB
    print(f"fcmoe run {' '.join(sys.argv[1:])}: exit {done.returncode}, {wall:.0f} s wall, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
