"""Synthetic cohort: H&E-like pyramidal slides, expression matrix and ground truth.

``histcode synth`` (:mod:`histcode.synth.command`) writes a whole cohort with
:func:`make_cohort`; tests make single slides with :func:`write_test_slide`.
"""

from histcode.synth.cohort import Cohort, make_cohort
from histcode.synth.scan import write_slide, write_test_slide
from histcode.synth.tissue import SlideTruth

__all__ = [
    "Cohort",
    "SlideTruth",
    "make_cohort",
    "write_slide",
    "write_test_slide",
]
