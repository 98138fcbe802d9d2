"""Option types shared by the command-line tools (argparse ``type=`` callables).

    option_type(convert, accept, expected)   convert the text, then check the value;
                                             otherwise argparse's usage error saying
                                             what was expected and what was given
    positive_int, nonneg_int, nonneg_float   the common ones
"""

from __future__ import annotations

import argparse
import math


def option_type(convert, accept, expected, unparsed=None):
    """An argparse type: ``convert(text)``, then ``accept(value)``, else an error
    saying what was expected (``unparsed``: when the text does not convert)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {unparsed or expected}, "
                                             f"got {text!r}") from None
        if not accept(value):
            shown = text if convert is float else value
            raise argparse.ArgumentTypeError(f"expected {expected}, got {shown}")
        return value
    return parse


positive_int = option_type(int, lambda v: v >= 1, "a positive integer")
nonneg_int = option_type(int, lambda v: v >= 0, "an integer >= 0")
nonneg_float = option_type(float, lambda v: math.isfinite(v) and v >= 0,
                           "a finite number >= 0", unparsed="a number")
