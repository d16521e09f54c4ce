"""Step-speed benchmark: AdamNX {for-loop, foreach, fused} vs torch AdamW and the authors' loop.

Same as `adamnx perf`; see `python benchmarks/step_speed.py --help`. Results for our machines are recorded
next to this file, in results/.
"""

import argparse
import sys

from adamnx.bench.perf import add_arguments, run_from_args

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(run_from_args(parser.parse_args()))
