"""What a config value may be: a `Rule` is a predicate and the phrase an error line quotes
(`KEY=VALUE: use a positive integer`). The training config's rules (`training.validate`) and each
eval type's (`evals/*.py`, `Key.rule`) are built from these."""

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp


class Rule(NamedTuple):
    ok: Callable[[Any], bool]
    allowed: str  # what the error line says is allowed


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_seq(v: Any, item: Callable[[Any], bool]) -> bool:
    return isinstance(v, (tuple, list)) and all(item(x) for x in v)


def _float_dtype(v: Any) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(v), jnp.floating)
    except TypeError:
        return False


def one_of(allowed: Sequence[Any]) -> Rule:
    return Rule(lambda v: any(v == c and type(v) is type(c) for c in allowed), choices(allowed))


def choices(allowed: Sequence[Any]) -> str:
    return "one of " + ", ".join(repr(c) for c in allowed)


INT = Rule(is_int, "an integer")
POSITIVE_INT = Rule(lambda v: is_int(v) and v > 0, "a positive integer")
COUNT = Rule(lambda v: is_int(v) and v >= 0, "an integer >= 0")
POSITIVE = Rule(lambda v: is_number(v) and v > 0, "a positive number")
NON_NEGATIVE = Rule(lambda v: is_number(v) and v >= 0, "a number >= 0")
NUMBER = Rule(is_number, "a finite number")
BETA = Rule(lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
FRACTION = Rule(lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
BOOL = Rule(lambda v: isinstance(v, bool), "True or False")
STRING = Rule(lambda v: isinstance(v, str), "a string")
NAME = Rule(lambda v: isinstance(v, str) and bool(v), "a non-empty string")
FLOAT_DTYPE = Rule(_float_dtype, "a floating dtype: 'float32', 'bfloat16' or 'float16'")
NAMES = Rule(
    lambda v: isinstance(v, str) or is_seq(v, lambda x: isinstance(x, str)),
    "a string or a list of strings",
)
POSITIVE_INTS = Rule(
    lambda v: is_seq(v, POSITIVE_INT.ok) and len(v) > 0, "a list of positive integers"
)
