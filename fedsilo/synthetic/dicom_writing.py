"""What every synthetic generator writes the same way: deterministic UIDs, DS values, and the
fake but realistic-looking PHI (patient names, birth dates, institutions) that privacy tests
search for.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from pydicom.uid import (
    generate_uid,
)

__all__ = ["GENERATOR_VERSION"]

#: Bumped whenever the generated pixels or tags change for a given seed.
GENERATOR_VERSION = "1"

_INSTITUTIONS = (
    "St. Aldhelm General Hospital",
    "Riverside University Medical Center",
    "Hollowbrook Regional Clinic",
    "Mercy Vale Teaching Hospital",
    "Northgate Community Hospital",
    "Lakeshore Children's and Adult Hospital",
)
_FIRST_NAMES = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Keiko", "Lars", "Maja", "Nikolai", "Olga", "Pedro", "Quentin", "Rosa", "Samir", "Tereza",
    "Ulrich", "Vera", "Wen", "Ximena", "Yusuf", "Zofia",
)  # fmt: skip
_LAST_NAMES = (
    "Andersson", "Bianchi", "Castillo", "Dubois", "Eriksen", "Fischer", "Garcia", "Horvath",
    "Ivanova", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov",
    "Quinn", "Rossi", "Schmidt", "Tanaka", "Urban", "Varga", "Weber", "Xu", "Yilmaz", "Zeller",
)  # fmt: skip


def _fmt_ds(value: float) -> str:
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8g}"[:16]


def _uid(*parts: object) -> str:
    return str(
        generate_uid(entropy_srcs=["fedsilo-synthetic", GENERATOR_VERSION, *map(str, parts)])
    )


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    name: str
    birth_date: dt.date
    sex: str


def _draw_patient(rng: np.random.Generator, prefix: str, number: int) -> _Patient:
    first = _FIRST_NAMES[int(rng.integers(len(_FIRST_NAMES)))]
    last = _LAST_NAMES[int(rng.integers(len(_LAST_NAMES)))]
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 68)))
    return _Patient(
        patient_id=f"{prefix}{number:06d}",
        name=f"{last}^{first}",
        birth_date=birth,
        sex=str(rng.choice(["F", "M"])),
    )
