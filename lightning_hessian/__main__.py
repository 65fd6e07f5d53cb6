"""``python -m lightning_hessian {plot,regress,table} ...``: see :mod:`lightning_hessian.analysis.cli`."""

import sys

from lightning_hessian.analysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
