"""herald's benchmarks: `make bench` runs them and rewrites bench/RESULTS.md."""
