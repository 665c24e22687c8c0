"""Command-line manners shared by every console script: an unknown flag is named with the
nearest known one (``unknown argument: --modle (did you mean --model?)``), printed once, no
traceback. Serving code (cxr-predict, cxr-app) and training (cxr-train) use the same rule; a
verb's expected failure is one ``error: ...`` line and exit status 2 (:func:`answer`)."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Callable


def suggest(name: str, known) -> str:
    """`` (did you mean --x?)`` for the known flag nearest to ``name`` (without dashes), or ``""``."""
    close = difflib.get_close_matches(name.lstrip("-"), [k.lstrip("-") for k in known], n=1, cutoff=0.6)
    return f" (did you mean --{close[0]}?)" if close else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with unknown ``--flags`` reported by name and the nearest known flag."""

    def parse_args(self, args=None, namespace=None):
        namespace, extra = self.parse_known_args(args, namespace)
        if extra:
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            flags = [a.split("=", 1)[0] for a in extra if a.startswith("-")]
            if flags:
                self.error(f"unknown argument: {flags[0]}{suggest(flags[0], known)}")
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return namespace


def fail(error: object) -> int:
    """A verb's expected failure: ``error: <message>`` on stderr (no traceback); returns exit status 2."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def answer(work: Callable[[], object], *errors: type[Exception]) -> int:
    """Run a verb's work and print what it returns (a folder, a URL, a summary) on stdout: exit
    status 0 (None: the work printed its own output, or has none); on one of ``errors``, print
    ``error: <message>`` on stderr instead (:func:`fail`): exit status 2."""
    try:
        out = work()
    except errors as e:
        return fail(e)
    if out is not None:
        print(out)
    return 0
