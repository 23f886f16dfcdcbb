"""Nothing identifying leaves a silo: every message a silo sends during a run (secure and plain),
serialised as Flower puts it on the wire, is searched for every PHI value of the synthetic DICOM
data (names, IDs, dates, UIDs, institution, physicians) and for the silo's file paths."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from flwr.app import Message
from flwr.common.serde import message_to_proto

from aggregator.aggregation import PlainAggregation
from aggregator.federated_run import FederatedRun
from fedsilo.local_consortium import pin_roster
from silo_client.client_app import app as client_app
from tests.conftest import TINY_PLAN
from tests.harness import InProcessGrid
from training_plan import parse_plan

PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyDate",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)


def _phi_values(homes: list) -> set[str]:
    values: set[str] = set()
    for home in homes:
        folder = Path(home.datasets["default"])
        values.add(str(folder))
        values.add(str(home.root))
        for path in sorted((folder / "dicom").glob("*.dcm")):
            values.add(path.name)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for keyword in PHI_KEYWORDS:
                value = str(ds.get(keyword, "") or "")
                if len(value) >= 6:  # shorter strings (e.g. sex, 3-digit ids) match by chance
                    values.add(value)
    return values


@pytest.mark.parametrize("secure", [True, False])
def test_no_phi_in_any_message_a_silo_sends(silo_homes: list, tmp_path: Path, secure: bool) -> None:
    sent: list[bytes] = []

    def record(request: Message, reply: Message) -> Message:
        sent.append(message_to_proto(reply).SerializeToString())
        return reply

    if secure:
        pin_roster(silo_homes)
        plan = parse_plan(TINY_PLAN + "secure_aggregation: {max_weight: 40}\n")
        aggregation = None
    else:
        plan = parse_plan(TINY_PLAN + "secure_aggregation: {enabled: false}\n")
        aggregation = PlainAggregation()
    grid = InProcessGrid(
        {i + 1: (client_app, {"home": str(h.root)}) for i, h in enumerate(silo_homes)}, tap=record
    )
    result = FederatedRun(plan, tmp_path / "run", "phi", aggregation=aggregation).run(grid)
    assert result.status == "done"
    assert len(sent) >= (18 if secure else 6), "every reply of every stage was recorded"

    phi = _phi_values(silo_homes)
    assert len(phi) > 50, "the synthetic data must carry PHI for this test to mean anything"
    # the search itself finds PHI where PHI is: in the silo's own DICOM bytes
    first = next((Path(silo_homes[0].datasets["default"]) / "dicom").glob("*.dcm")).read_bytes()
    assert sum(v.encode() in first for v in phi) >= 5
    blob = b"\n".join(sent)
    leaked = sorted(v for v in phi if v.encode() in blob)
    assert not leaked, f"identifying values left a silo: {leaked[:5]}"
