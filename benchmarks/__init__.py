"""Speed and accuracy benchmarks; each script prints one JSON line.

Run one with ``python -m benchmarks.<name>``, or all of them with
``python -m benchmarks.run [--quick] [--gpu]``, which prints one JSON object and writes
``benchmarks/RESULTS.md`` (date, machine, each figure with its ratio and goal, the accuracy
table). Generated data goes under ``benchmarks/out/`` (never committed).

A benchmark is a module here that ends with a ``SPEC`` (:class:`benchmarks.spec.Benchmark`):
what it measures, its goals, its arguments and the functions that render its report; the
runner finds it, ``python -m benchmarks.run --list`` shows it.
"""
