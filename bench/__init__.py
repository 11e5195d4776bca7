"""firehosed benchmarks: every figure a ratio to a ceiling measured in the same run.

Entry point: `bench/run` (full, writes bench/RESULTS.md) or `bench/run --quick`.
"""
