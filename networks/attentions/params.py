"""Checks for an attention module's parameter, shared by the modules' `check_param` classmethods.

Each returns the value the module builds with (16.0 from argparse -> 16) or raises ValueError with
one line naming the module and its parameter, e.g. "se: reduction must be an integer >= 1, got 0".
"""
import math
import numbers


def _show(param):
    return format(param, "g") if isinstance(param, numbers.Real) and not isinstance(param, bool) else repr(param)


def _is_real(param):
    return isinstance(param, numbers.Real) and not isinstance(param, bool)


def integer(module: str, what: str, param, odd: bool = False) -> int:
    """An integer >= 1 (odd if asked); integral floats such as 16.0 (argparse's type=float) pass."""
    ok = _is_real(param) and math.isfinite(param) and float(param).is_integer() and param >= 1
    if not ok or (odd and int(param) % 2 == 0):
        raise ValueError(f"{module}: {what} must be {'an odd' if odd else 'an'} integer >= 1, got {_show(param)}")
    return int(param)


def positive(module: str, what: str, param) -> float:
    """A finite number > 0."""
    if not (_is_real(param) and math.isfinite(param) and param > 0):
        raise ValueError(f"{module}: {what} must be a finite number > 0, got {_show(param)}")
    return float(param)


def none(module: str, param) -> None:
    """Parameter-free modules: only None (the flag not given) is accepted."""
    if param is not None:
        raise ValueError(f"{module}: takes no parameter (leave --attention_param unset), got {_show(param)}")
    return None
