"""Benchmarks of samhq_fast against its peers (official segment_anything_hq, transformers).

Run with ``python -m pytest bench/`` (see README, "Performance"); ``python -m bench.report`` turns
the pytest-benchmark JSON into ``bench/results/<device>-<date>.md`` / ``.json``.
"""
