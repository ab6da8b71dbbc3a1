"""Speed benchmarks: each comparison is timed interleaved against its baseline in the same run."""
