"""The two home folders and their ``--home`` options: one environment variable per home.

Each variable is declared here once and handed to typer (``envvar=``), so ``--help`` shows it
and no command reads another role's variable by mistake (``aggregator plans`` once read the
silo's ``FEDSILO_HOME`` and wrote a registry into a silo home).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer


@dataclass(frozen=True)
class HomeKind:
    """A role's home folder: its env variable, default place and the command that creates it."""

    role: str
    envvar: str
    default: str
    init_command: str

    def option(self, *names: str, help_text: str | None = None) -> Any:
        """The typer option for this home (``--home`` unless other names are given)."""
        return typer.Option(
            Path(self.default),
            *(names or ("--home",)),
            envvar=self.envvar,
            show_envvar=True,
            help=help_text or f"{self.role.capitalize()} home folder.",
        )

    def missing_message(self, root: Path, marker: str) -> str:
        """The one line for a home that does not exist: what, where, how to create it."""
        return (
            f"{root} is not a {self.role} home (no {marker}); create it with "
            f"'{self.init_command.format(home=root)}' (or point env {self.envvar} at it)"
        )


SILO_HOME = HomeKind(
    role="silo",
    envvar="FEDSILO_HOME",
    default="~/.fedsilo/silo",
    init_command="silo init --home {home} --name HOSPITAL --dataset DIR",
)
CONSORTIUM_HOME = HomeKind(
    role="consortium",
    envvar="FEDSILO_CONSORTIUM_HOME",
    default="~/.fedsilo/consortium",
    init_command="aggregator init --home {home} --name CONSORTIUM --address HOST:PORT",
)
