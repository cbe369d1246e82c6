"""Command-line scripts beyond the four stages: continual learning, difficulty scores, cost, tables,
assessment correlations, benchmarks. Each runs as ``python3 scripts/NAME.py``; the package form lets
the tests import them."""
