"""Command-line entry point of training (flags only).

Until the training issue lands this entry point only says so and exits non-zero, so no run silently does nothing.
"""
import sys


def run(argv=None):
    del argv
    print("jaxattn training is not implemented yet (see the training issue); "
          "`python -m train.main --config configs/<model>.py` will run once it lands.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv))
