"""How hf_kd's configs take a choice option: a str-valued `Enum` (one docstring per member, as laplace-torch's
options), given as the member or as its plain string value (YAML recipes, command-line flags).
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


class StrEnum(str, Enum):
    """Base of hf_kd's choice options: a `str` whose `str()` and f-string form are its value (`"linear"`, not
    `"TinyBERTProjection.LINEAR"`), so that messages, file names and JSON read as the plain string did."""

    def __str__(self) -> str:
        return self.value


def to_enum(enum_class: type[E], value, name: str, allow_none: bool = False) -> E | None:
    """
    `value` as a member of `enum_class`, for a config's `__post_init__`.

    Args:
        enum_class (`type[Enum]`):
            A `class X(str, Enum)`.
        value (`str` or `enum_class`):
            The member or its string value.
        name (`str`):
            The config field, for the error.
        allow_none (`bool`, *optional*, defaults to `False`):
            Whether `None` (the option's "off" or default) is accepted; it is returned as is.

    Raises:
        `ValueError`: `value` is not one of the members' values; the message names it and the accepted values, e.g.
        `distill_from must be one of ('none', 'final_exit', 'teacher'), got 'teachr'`.
    """
    if allow_none and value is None:
        return None
    try:
        return enum_class(value)
    except ValueError:
        accepted = ((None,) if allow_none else ()) + tuple(member.value for member in enum_class)
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}") from None
