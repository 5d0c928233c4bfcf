import sys

from . import main

if __name__ == "__main__":  # guard: Megatron's checkpoint writer re-imports the main module
    sys.exit(main())
