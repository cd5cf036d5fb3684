"""The rental-price pipelines' entry point: `python pipeline.py --help` lists the commands.

The pipelines themselves are in pipelines/ (one file of wiring each, and the registry in pipelines/__init__.py);
their steps are in components/steps.py, and the logic of each step in its stage's module under components/.
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
