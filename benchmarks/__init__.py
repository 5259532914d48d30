"""Speed and accuracy benchmarks; each script prints JSON."""
