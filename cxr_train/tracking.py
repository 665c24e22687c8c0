"""Watching a run: the trackers ``cxr-train --report_to`` is documented with, the extra that
installs each, and the check that names that extra before anything is loaded or trained.

``--report_to`` is transformers' own ``TrainingArguments.report_to``; the Trainer's integration
logs the loss and, at every evaluation, everything ``compute_metrics`` returns (``eval/roc_auc``,
``eval/sensitivity``, ``eval/specificity``, ...).

- ``tensorboard`` (``pip install 'cxr-transfer[track]'``): event files under
  ``OUTPUT_DIR/runs``; watch with ``tensorboard --logdir OUTPUT_DIR/runs``.
- ``trackio`` (``pip install 'cxr-transfer[trackio]'``): local and offline unless a Space is
  asked for (``--trackio_space_id``); a SQLite file per ``--project`` (default ``huggingface``) in
  ``$TRACKIO_DIR`` (default ``$HF_HOME/trackio``); watch with ``trackio show --project NAME``.
"""

from __future__ import annotations

import importlib.util

# tracker -> (the module it needs, the extra that installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", "track"),
    "trackio": ("trackio", "trackio"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):    # a parent package missing, or a module blocked in sys.modules
        return False


def check_report_to(report_to) -> None:
    """Raise ConfigError when ``report_to`` (a name or a list, as TrainingArguments holds it)
    names a tracker of :data:`TRACKERS` that is not installed, saying which extra installs it.
    ``none``/``all`` and transformers' other integrations (wandb, mlflow, ...) pass unchecked."""
    from cxr_train.config import ConfigError

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        module, extra = TRACKERS.get(name, (None, None))
        if module is not None and not _installed(module):
            raise ConfigError(f"--report_to {name} needs {module}, which is not installed: "
                              f"pip install 'cxr-transfer[{extra}]' (or pip install {module}), "
                              f"or train with --report_to none")
