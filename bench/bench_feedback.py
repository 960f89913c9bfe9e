"""Feedback-service load benchmark (issue 3): rankings/s and p50/p99 latency on SQLite and PostgreSQL.

    .venv/bin/python bench/bench_feedback.py --clients 16 --workers 2                 # SQLite in a temporary directory
    .venv/bin/python bench/bench_feedback.py --clients 16 --workers 2 --db postgresql+psycopg://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/bench_feedback.py --clients 16 --workers 2 --lease-batch 8  # leases?count=8, then rank each

The load generator and the server live in ``feedback_service/bench.py`` (``python -m feedback_service.bench``),
so the service package carries its own benchmark; this is its entry point beside the other benchmarks.
"""

import sys

from feedback_service.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
