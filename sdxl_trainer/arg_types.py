"""argparse value types shared by the trainer's and the evaluator's flags: a bad value is a usage error that
names the flag, not a traceback later."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {value}")
    return value


def positive_fraction(text: str) -> float:
    """A share in (0, 1]: zero would select nothing."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {value}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written (they hold example commands) and every flag's default shown, unless its help
    already says it: `--help` must not hide, say, a batch of 10 x accumulation 60 that makes a short run look hung."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction) or action.nargs == 0:
            return text + " (default: off)" if action.default is False else text + " (default: on)"
        shown = "%(default)s" if action.default not in (None, [], "") else "none"
        return f"{text} (default: {shown})"
