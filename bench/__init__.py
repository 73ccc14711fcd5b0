"""Side-by-side benchmarks (not part of the test suite).

``EDGEQUANT_BENCH_SRC=<a checkout>/src`` makes the bench measure that edgequant instead of the
installed one, e.g. the commit before a rebuild: it goes first on ``sys.path`` here, for the
bench process itself (zoo data, fidelity metrics), and first on PYTHONPATH for the edgequant
jobs it starts (``bench.runner.job_env``).
"""

import os
import sys

if os.environ.get("EDGEQUANT_BENCH_SRC"):
    sys.path.insert(0, os.environ["EDGEQUANT_BENCH_SRC"])
