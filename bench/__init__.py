"""DeltaBox benchmarks: each module prints tables and writes JSON under bench/results/."""
