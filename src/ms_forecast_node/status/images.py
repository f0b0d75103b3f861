"""Images of the result view: the job's montage and the per-therapy key images.

The key images are the Secondary Capture objects the report package already rendered from the
same forecast masks as the SEG (the overlay blended on the reference slices where that therapy
forecasts the most lesion voxels), so the page shows exactly what the PACS received; they are
only re-encoded as PNG here.
"""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path

import numpy as np

#: Therapy codes as the output file names carry them (report.build.file_name keeps
#: ``[A-Za-z0-9_.-]``; the dot is left out here so a code can never read as ``..``).
THERAPY_CODE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def montage_path(folder: Path) -> Path:
    return folder / "summary.png"


def key_image_files(folder: Path, therapy: str) -> list[Path]:
    """The therapy's key-image files in slice order (empty for a code that is not plain)."""
    if not THERAPY_CODE.match(therapy):
        return []
    return sorted((folder / "dicom").glob(f"key_images_{therapy}_[0-9][0-9][0-9].dcm"))


def png_bytes(path: Path) -> bytes:
    stat = path.stat()
    return _png(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _png(path: str, mtime_ns: int, size: int) -> bytes:
    """Decoded once per file version (mtime and size in the key): a reprocessed study writes
    new files, and the page asks for each image on every load."""
    import matplotlib.image
    import pydicom
    from pydicom.pixels import convert_color_space

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "RGB"))
    if photometric.startswith("YBR"):
        pixels = convert_color_space(pixels, photometric, "RGB")
    if pixels.ndim == 4:  # multi-frame: the first frame stands for the object
        pixels = pixels[0]
    buffer = io.BytesIO()
    if pixels.ndim == 2:
        matplotlib.image.imsave(buffer, pixels, format="png", cmap="gray")
    else:
        matplotlib.image.imsave(buffer, np.asarray(pixels, dtype=np.uint8), format="png")
    return buffer.getvalue()
