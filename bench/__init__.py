"""Benchmarks: every row measured side by side in one invocation, reported as ratios."""
