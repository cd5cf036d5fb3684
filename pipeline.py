"""The rental-price pipelines' entry point: `python pipeline.py --help` lists the commands.

The pipelines themselves are in pipelines/ (one file of wiring each, and the registry in pipelines/__init__.py);
their steps are in components/steps.py, and the logic of each step in its stage's module under components/.
"""

import sys

if __name__ == "__main__":
    from pipelines import warm

    code = warm.run(sys.argv)  # a local run runs in a fork of the step server, which has imported what it needs
    if code is not None:
        sys.exit(code)

from pipelines.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
