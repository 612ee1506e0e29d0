"""The sign of stored phase: which vendors store phase against the convention the field fit assumes.

metaqsm's convention (:mod:`metaqsm_bids.qsm.field.echofit`): the phase of echo ``n`` is
``phi_n = phi_0 + 2*pi*f*TE_n`` (rad), and ``f`` (Hz) is positive where the field is
stronger than B0, i.e. in paramagnetic tissue (veins, iron-rich deep grey matter:
positive chi). This is the convention of the MEDI toolbox's complex images after its
vendor readers (Liu et al.). Negating every echo's phase negates ``f`` and therefore
chi, exactly and silently, so the sign must be right before the fit.

Vendors differ. The MEDI toolbox's DICOM reader (``Read_DICOM.m``) builds the complex image
as ``magnitude * exp(-1i * phase)`` in its Siemens and Philips branches and as
``real + 1i * imag`` or ``magnitude * exp(+1i * phase)`` in its GE branches; SEPIA exposes the
same choice as its "invert phase" switch. The table
:data:`VENDOR_PHASE_SIGN` encodes that; the README states it with this source. A NIfTI
converter (dcm2niix) keeps the stored sign, so the table applies to converted data too.
"""
import re
from dataclasses import dataclass

import numpy as np

#: ``--phase-sign`` choices.
PHASE_SIGN_CHOICES = ("auto", "as-is", "invert")

#: (regular expression on the sidecar's ``Manufacturer``, case-insensitive; vendor; sign to apply)
VENDOR_PHASE_SIGN = (
    (r"siemens", "Siemens", -1),
    (r"philips", "Philips", -1),
    (r"^\s*ge\b|general electric", "GE", +1),
    (r"^metaqsm-simulate$", "metaqsm-simulate", +1),
)

#: Where the table comes from (quoted in provenance and the README).
SOURCE = ("MEDI toolbox Read_DICOM.m (Siemens/Philips: exp(-1i*phase); GE: exp(+1i*phase)); "
          "SEPIA's 'invert phase' option")


@dataclass(frozen=True)
class PhaseSign:
    """The factor (+1 or -1) applied to every echo's phase, why, and a warning when the vendor is unknown."""

    factor: int
    choice: str
    reason: str
    warning: str = None

    def provenance(self):
        """The sidecar record of this decision (its warning goes to the run's Warnings, with the others)."""
        return {"PhaseSignChoice": self.choice, "PhaseSignFactor": self.factor, "PhaseSignReason": self.reason}


def vendor_phase_sign(manufacturer):
    """``(vendor, factor)`` for a ``Manufacturer`` string from the table, or ``(None, None)`` when unknown."""
    text = str(manufacturer or "")
    for pattern, vendor, factor in VENDOR_PHASE_SIGN:
        if re.search(pattern, text, re.IGNORECASE):
            return vendor, factor
    return None, None


def resolve_phase_sign(choice, manufacturer, where=""):
    """The :class:`PhaseSign` for ``--phase-sign`` ``choice`` and the sidecar's ``Manufacturer``.

    ``as-is`` and ``invert`` are the user's decision; ``auto`` looks the vendor up in
    :data:`VENDOR_PHASE_SIGN` and, for a vendor not in it, keeps the phase as stored with a
    warning (prefixed by ``where``, e.g. the file) that says how to decide.
    """
    if choice not in PHASE_SIGN_CHOICES:
        raise ValueError(f"phase sign must be one of {', '.join(PHASE_SIGN_CHOICES)}, got {choice!r}")
    prefix = f"{where}: " if where else ""
    if choice == "as-is":
        return PhaseSign(+1, choice, "--phase-sign as-is: phase used as stored")
    if choice == "invert":
        return PhaseSign(-1, choice, "--phase-sign invert: every echo's phase negated")
    vendor, factor = vendor_phase_sign(manufacturer)
    if vendor is None:
        shown = repr(manufacturer) if manufacturer else "missing"
        return PhaseSign(+1, choice, f"Manufacturer {shown} is not in the vendor table: phase used as stored",
                         f"{prefix}Manufacturer {shown} is not in metaqsm's phase-sign table: the phase is used as "
                         "stored, which gives inverted susceptibility (veins and deep grey matter negative) if "
                         "this scanner stores phase like Siemens/Philips; check the Chimap and pass "
                         "--phase-sign as-is or --phase-sign invert")
    action = "negated" if factor < 0 else "used as stored"
    return PhaseSign(factor, choice, f"Manufacturer {manufacturer!r} ({vendor}): phase {action} ({SOURCE})")


def apply_phase_sign(phase_rad, factor):
    """``factor * phase_rad`` (float32 rad) wrapped back into [-pi, pi): pi and -pi are one phase."""
    if factor not in (1, -1):
        raise ValueError(f"phase sign factor must be +1 or -1, got {factor!r}")
    out = np.array(phase_rad, dtype=np.float32)
    if factor == -1:
        np.negative(out, out=out)
        out[out >= np.float32(np.pi)] = -np.float32(np.pi)
    return out
