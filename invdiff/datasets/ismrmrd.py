"""The ISMRMRD XML header of a fastMRI file: the encoded and recon grids, the acquired columns, the fields of view.

Parsed with defusedxml (the header is untrusted input). Namespace :data:`ISMRMRD_NAMESPACE`; sizes are
``(x, y, z)`` = (readout H, phase W, partitions).

    >>> header = parse_ismrmrd_header(h5["ismrmrd_header"][()], kspace_shape=h5["kspace"].shape)
    >>> header.recon_size, header.padding
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"
# Without a usable header, fastMRI's convention: crop to 320 x 320, or keep a smaller k-space's own size.
DEFAULT_RECON_SIZE = (320, 320)


@dataclass(frozen=True)
class ScanHeader:
    """What the ISMRMRD header says about the grid (or the k-space-shape fallback, ``source="fallback"``).

    Sizes are ``(x, y, z)`` = (readout H, phase W, partitions); ``padding = (left, right)``: only k-space
    columns in ``[left, right)`` were acquired (fastMRI: ``left = enc_y // 2 - center``,
    ``right = left + maximum + 1`` from ``encodingLimits/kspace_encoding_step_1``).
    """

    encoded_size: tuple[int, int, int]
    recon_size: tuple[int, int, int]
    padding: tuple[int, int]
    kspace_center: int | None = None
    kspace_maximum: int | None = None
    encoded_fov_mm: tuple[float, float, float] | None = None
    recon_fov_mm: tuple[float, float, float] | None = None
    source: str = "ismrmrd_header"


class HeaderError(ValueError):
    """The ISMRMRD XML is missing, unparsable or lacks a required field (the reader falls back and warns)."""


def parse_ismrmrd_header(xml: bytes | str, kspace_shape: Sequence[int] | None = None) -> ScanHeader:
    """Parse ISMRMRD XML (namespace :data:`ISMRMRD_NAMESPACE`) with defusedxml.

    Required: ``encoding/encodedSpace/matrixSize/{x,y}``, ``encoding/reconSpace/matrixSize/{x,y}`` and
    ``encoding/encodingLimits/kspace_encoding_step_1/{center,maximum}``; ``z`` defaults to 1 and the fields
    of view are optional. ``kspace_shape`` (``(..., H, W)``), when given, checks the padding against W.
    Raises :class:`HeaderError` (a ``ValueError``) saying which field is wrong.
    """
    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import ParseError, fromstring

    try:
        root = fromstring(xml)
    except (ParseError, DefusedXmlException) as err:
        raise HeaderError(f"not well-formed or unsafe XML ({type(err).__name__}: {err})") from None
    expected_root = f"{{{ISMRMRD_NAMESPACE}}}ismrmrdHeader"
    if root.tag != expected_root:
        raise HeaderError(f"root element is {root.tag!r}; expected {expected_root!r}")
    encoding = _xml_child(root, "encoding")
    encoded = _xml_size(encoding, "encodedSpace/matrixSize")
    recon = _xml_size(encoding, "reconSpace/matrixSize")
    center = _xml_int(encoding, "encodingLimits/kspace_encoding_step_1/center")
    maximum = _xml_int(encoding, "encodingLimits/kspace_encoding_step_1/maximum")
    left = encoded[1] // 2 - center
    right = left + maximum + 1
    width = encoded[1] if kspace_shape is None else int(kspace_shape[-1])
    if not 0 <= left < right <= width:
        raise HeaderError(f"kspace_encoding_step_1 center={center}, maximum={maximum} with encoded y={encoded[1]} "
                          f"give acquired columns [{left}, {right}); expected 0 <= left < right <= W={width}")
    return ScanHeader(encoded_size=encoded, recon_size=recon, padding=(left, right), kspace_center=center,
                      kspace_maximum=maximum, encoded_fov_mm=_xml_fov(encoding, "encodedSpace/fieldOfView_mm"),
                      recon_fov_mm=_xml_fov(encoding, "reconSpace/fieldOfView_mm"))


def fallback_header(kspace_shape: Sequence[int]) -> ScanHeader:
    """The grid without a header: encoded = k-space ``(H, W)``; recon = ``min(H, 320) x min(W, 320)``; all
    columns acquired."""
    height, width = int(kspace_shape[-2]), int(kspace_shape[-1])
    recon = (min(height, DEFAULT_RECON_SIZE[0]), min(width, DEFAULT_RECON_SIZE[1]), 1)
    return ScanHeader(encoded_size=(height, width, 1), recon_size=recon, padding=(0, width), source="fallback")


def _xml_path(path: str) -> str:
    return "/".join(f"{{{ISMRMRD_NAMESPACE}}}{part}" for part in path.split("/"))


def _xml_child(element, path: str):
    child = element.find(_xml_path(path))
    if child is None:
        raise HeaderError(f"missing element {path}")
    return child


def _xml_int(element, path: str) -> int:
    text = (_xml_child(element, path).text or "").strip()
    try:
        return int(text)
    except ValueError:
        raise HeaderError(f"element {path} is {text!r}; expected an integer") from None


def _xml_size(encoding, path: str) -> tuple[int, int, int]:
    x, y = _xml_int(encoding, f"{path}/x"), _xml_int(encoding, f"{path}/y")
    z = _xml_int(encoding, f"{path}/z") if encoding.find(_xml_path(f"{path}/z")) is not None else 1
    if min(x, y, z) < 1:
        raise HeaderError(f"{path} is ({x}, {y}, {z}); expected positive sizes")
    return x, y, z


def _xml_fov(encoding, path: str) -> tuple[float, float, float] | None:
    try:
        return tuple(float((_xml_child(encoding, f"{path}/{axis}").text or "").strip()) for axis in "xyz")
    except (HeaderError, ValueError):
        return None


__all__ = ["ScanHeader", "HeaderError", "parse_ismrmrd_header", "fallback_header", "ISMRMRD_NAMESPACE",
           "DEFAULT_RECON_SIZE"]
