"""Reading whole-slide images: which reader opens a slide, and slide ids.

:func:`open_slide` opens a slide with a registered reader (:data:`readers`): ``openslide``
(:class:`~histcode.slidereader.SlideReader`, every format OpenSlide 4 reads), ``tiff``
(:class:`~histcode.tiffjpeg.TiffJpegReader`, JPEG-tiled TIFF levels decoded directly) and
``auto`` (the fastest that applies). :func:`slide_id` names a slide by its file. Readers only
read; segmentation, tiling and heatmaps are separate functions that take a reader.

The reader itself, its errors and the level-0 µm/px live in :mod:`histcode.slidereader` (so
that the TIFF reader can subclass it without importing this module); they are re-exported
here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from histcode.builders import Builders
from histcode.slidereader import (
    MPP_RANGE,
    MPP_TIMES_POWER,
    MissingMppError,
    MppSource,
    SlideError,
    SlideReader,
    check_mpp,
    fingerprint,
    metadata_mpp,
    resolve_mpp,
    rgba_to_rgb,
)

log = logging.getLogger(__name__)

#: File extensions treated as slides when a folder is given. OpenSlide decides the format from
#: the content, not the name; this list only decides what to pick up from a folder.
SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
)

readers: Builders[SlideReader] = Builders("slide reader")


def slide_id(path: Path | str) -> str:
    """The slide id of a file: its name without the extension (``TCGA-…-01A.svs`` → ``TCGA-…-01A``).

    A DICOM whole-slide image is a folder of ``.dcm`` files (one per level): its id is the
    folder's name, whichever of its files is given.

    Raises:
        ValueError: the id is empty, hidden or would escape a folder (``..``).
    """
    if Path(path).suffix.lower() == ".dcm":
        sid = Path(path).resolve().parent.name
        check_slide_id(sid, path)
        return sid
    sid = Path(path).name
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if sid.lower().endswith(ext):
            sid = sid[: -len(ext)]
            break
    else:
        sid = Path(path).stem
    check_slide_id(sid, path)
    return sid


def is_safe_slide_id(sid: str) -> bool:
    """Whether ``sid`` can name a group or file inside an output folder and nothing else.

    Not: empty, starting with ``.`` (hidden, ``..``), or holding a path separator or NUL.
    """
    return bool(sid) and not sid.startswith(".") and not any(c in sid for c in "/\\\0")


def check_slide_id(sid: str, source: object) -> None:
    """Refuse slide ids that cannot safely name a group or file in an output folder.

    Raises:
        ValueError: empty, starting with ``.``, or containing a path separator.
    """
    if not is_safe_slide_id(sid):
        raise ValueError(
            f"{source}: slide id {sid!r} cannot name an output (empty, hidden, or contains a "
            "path separator). Rename the file to a plain name such as TCGA-AA-0001-01A.svs."
        )


@readers.register("openslide")
def _openslide_reader(
    path: Path | str, mpp_override: float | None = None, mpp_fallback: float | None = None
) -> SlideReader:
    return SlideReader(path, mpp_override=mpp_override, mpp_fallback=mpp_fallback)


@readers.register("tiff")
def _tiff_reader(
    path: Path | str, mpp_override: float | None = None, mpp_fallback: float | None = None
) -> SlideReader:
    """JPEG-tiled TIFF levels decoded directly (:mod:`histcode.tiffjpeg`); raises
    :class:`SlideError` when no level of the slide can be."""
    from histcode.tiffjpeg import TiffJpegReader

    return TiffJpegReader(path, mpp_override=mpp_override, mpp_fallback=mpp_fallback)


#: Extensions the ``auto`` reader tries the direct TIFF reader on (the others go to OpenSlide).
TIFF_EXTENSIONS = (".svs", ".tif", ".tiff")


@readers.register("auto")
def _auto_reader(
    path: Path | str, mpp_override: float | None = None, mpp_fallback: float | None = None
) -> SlideReader:
    """The fastest reader for the slide: ``tiff`` for JPEG-tiled Aperio and generic TIFF,
    else ``openslide`` (the reason is logged)."""
    if Path(path).suffix.lower() in TIFF_EXTENSIONS:
        try:
            reader = _tiff_reader(path, mpp_override=mpp_override, mpp_fallback=mpp_fallback)
        except (MissingMppError, FileNotFoundError, ValueError):
            raise
        except SlideError as err:
            log.info("%s: read with OpenSlide: %s", path, err)
        else:
            if reader.fallback_reason:  # type: ignore[attr-defined]
                log.info("%s: some levels read with OpenSlide: %s", path, reader.fallback_reason)  # type: ignore[attr-defined]
            return reader
    else:
        log.debug("%s: read with OpenSlide (not a TIFF-based extension)", path)
    return SlideReader(path, mpp_override=mpp_override, mpp_fallback=mpp_fallback)


def open_slide(
    path: Path | str,
    mpp_override: float | None = None,
    reader: str = "auto",
    mpp_fallback: float | None = None,
) -> SlideReader:
    """Open a slide with a registered reader (``auto`` by default).

    Readers: ``auto`` (``tiff`` where it applies, else ``openslide``; the reason is logged
    at INFO), ``tiff`` (JPEG-tiled Aperio SVS and generic TIFF levels decoded directly, the
    rest through OpenSlide), ``openslide``.

    Args:
        path: the slide file.
        mpp_override: level-0 µm/px that wins over the metadata.
        reader: name of a registered reader.
        mpp_fallback: level-0 µm/px used only when the metadata has none.
    """
    kwargs = {} if mpp_fallback is None else {"mpp_fallback": mpp_fallback}
    return readers.create(reader, path=path, mpp_override=mpp_override, **kwargs)


__all__ = [
    "MPP_RANGE",
    "MPP_TIMES_POWER",
    "SLIDE_EXTENSIONS",
    "TIFF_EXTENSIONS",
    "MissingMppError",
    "MppSource",
    "SlideError",
    "SlideReader",
    "check_mpp",
    "check_slide_id",
    "fingerprint",
    "is_safe_slide_id",
    "metadata_mpp",
    "open_slide",
    "readers",
    "resolve_mpp",
    "rgba_to_rgb",
    "slide_id",
]
