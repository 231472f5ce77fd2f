"""``python -m bench``: print the benchmark table (ratios measured side by side in this invocation)."""

from __future__ import annotations

import argparse
import platform

import torch


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    from . import core

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    row = core.compare(opts.steps, opts.repeats)
    print("| row | flytrain | reference | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| 1. per-step overhead, default callbacks ({opts.steps} steps) | {row['trainer_steps_per_s']:.0f} steps/s "
          f"| hand loop {row['hand_steps_per_s']:.0f} steps/s | {row['ratio']:.3f}x | >= 0.95x |")


if __name__ == "__main__":
    main()
