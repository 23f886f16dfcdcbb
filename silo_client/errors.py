"""Error types of the silo client.

Every error a hospital operator can trigger with bad input is a :class:`SiloError` whose
message is one line: what went wrong, where, and how to fix it.
"""

from fedsilo_base.errors import UserError


class SiloError(UserError):
    """Base class of all silo-client errors meant to be shown to an operator (no traceback)."""


class DataError(SiloError):
    """The hospital's local data (DICOM folder, labels file, cache) cannot be used as given."""


class SiloConfigError(SiloError):
    """The silo home or the SuperNode's node-config is missing or wrong."""


class PlanRefused(SiloError):
    """The silo refuses to run a plan (not approved, altered, out of policy); no data was read."""
