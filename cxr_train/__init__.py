"""Training side of cxr-transfer: configuration, data, strategies, the Trainer loop, clinical
metrics, model cards, OOD fitting, plots, Hub and Space publishing. Serving (``cxr``) never
imports it. Needs the ``train`` extra: ``pip install "cxr-transfer[train]"``."""

import importlib.util as _util

# import name -> distribution (the "train" extra in pyproject.toml)
TRAIN_REQUIREMENTS = {"datasets": "datasets", "peft": "peft", "evaluate": "evaluate", "accelerate": "accelerate",
                      "sklearn": "scikit-learn", "matplotlib": "matplotlib", "yaml": "pyyaml"}
_missing = sorted(dist for mod, dist in TRAIN_REQUIREMENTS.items() if _util.find_spec(mod) is None)
if _missing:
    raise ImportError(f"training needs {', '.join(_missing)} (not installed): pip install 'cxr-transfer[train]' "
                      "(serving alone, cxr.inference.Predictor and cxr-predict, needs no extra)")
