"""Which cost profile a bundle's rewards are computed with on this machine (the one place that chooses it).

Two places hold a profile: this machine's calibration of the bundle (``calibration.py``) and bundle.json's
``cost_profile`` (written by ``collect``). Serving logs and update-policy prefer the calibration; collect writes
the rows a bundle is trained on, so it reads bundle.json only and measures when that does not fit.
"""
from __future__ import annotations

from ..base.errors import CtxdraftError
from ..learning.costs import CostProfile

CALIBRATION_USES = ("ignore", "existing", "create")


def profile_for(bundle, calibration: str = "existing") -> tuple[CostProfile | None, object | None]:
    """The bundle's cost profile on this machine and the ``Calibration`` it came from (None: bundle.json's).

    ``calibration``: "ignore" reads bundle.json only; "existing" prefers this machine's calibration when one
    exists; "create" also calibrates now when routing would (``Bundle.calibration(create=True)``).
    Returns (None, None) when neither holds a profile of this version.
    """
    if calibration not in CALIBRATION_USES:
        raise CtxdraftError(f"calibration must be one of {CALIBRATION_USES}, got {calibration!r}")
    if calibration != "ignore":
        found = bundle.calibration(create=calibration == "create")
        if found is not None:
            return found.profile, found
    return CostProfile.from_dict(bundle.info.get("cost_profile")), None
