"""
The description of one setting, shared by the configuration table and the
modules that contribute settings to it.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs


@attrs.frozen
class Field:
    """
    One setting: where it lives, its type and default, and how it is checked.
    """

    section: str
    name: str
    kind: str  # "str", "int", "float", "bool", "list", "secret"
    default: Any
    help: str
    env: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env_names(self) -> tuple[str, ...]:
        generic = f"REDUCTRAI_{self.section}_{self.name}".upper()
        return self.env + (generic,)
