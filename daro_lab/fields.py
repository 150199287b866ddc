"""How a config section declares its fields: `setting(default, help, range=)` and the `Range` it checks.

The leaf under `daro_lab.config` and the sections that live with their layer (`daro_lab.tasks.base.TaskConfig`):
it imports nothing of daro_lab, so a layer below the config can declare its own section with it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts, written as an interval: "[0, inf)", "(0, 1]", "[1, inf)".

    Every float is also checked to be finite (NaN and +-inf are refused everywhere); a list of numbers
    is checked item by item; None (an optional field left unset) passes."""

    lo: float
    hi: float
    lo_open: bool
    hi_open: bool

    @classmethod
    def parse(cls, text: str) -> Range:
        m = re.fullmatch(r"\s*([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(-?inf|[-+0-9.e]+)\s*([\])])\s*", text)
        if not m:
            raise ValueError(f"bad range {text!r}: write an interval such as '[0, inf)' or '(0, 1]'")
        return cls(float(m[2]), float(m[3]), m[1] == "(", m[4] == ")")

    def __contains__(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below

    def __str__(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if v.is_integer() else repr(v)

        if math.isinf(self.hi):
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


REQUIRED: Any = dataclasses.MISSING  # the default of a field that a file must set (`setting(REQUIRED, ...)`)


def setting(default: Any, help: str, range: str | None = None, **kw: Any) -> Any:  # noqa: A002 - `help`, `range` read best here
    """A field of a config section (or of a grid file): its default (or REQUIRED), one line of help and, for
    numbers, the interval of valid values (`Range`)."""
    meta: dict[str, Any] = {"help": help}
    if range is not None:
        meta["range"] = Range.parse(range)
    if default is REQUIRED:
        return field(metadata=meta, **kw)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)
