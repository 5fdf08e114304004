"""Synthetic chest CT worst cases for the chest pipeline's tests (and, until the procedural
phantom of ``shared/phantoms`` lands, for training the nodule classifier).

Not a phantom for the product: a fast NumPy generator of the anatomy that broke the cartoon
pipeline — lungs that touch at the anterior junction behind a septum thinner than a voxel, a
trachea and main bronchi, a branching tapering vessel tree from each hilum, a heart notch, ribs,
spine, a scanner table with a foam pad under the body, correlated noise, partial volume of thick
slices (rendered at <= 1 mm and averaged), and lesions: solid, juxtavascular, juxtapleural,
ground-glass, part-solid, calcified nodules and pleural masses. Volume axes (z, y, x) with z
increasing towards the head and x towards the patient's left (LPS, identity orientation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.ndimage as ndi


@dataclass
class Lesion:
    kind: str  # solid, juxtavascular, juxtapleural, ground_glass, part_solid, calcified, mass
    centre_mm: tuple[float, float, float]  # x, y, z (patient, as the volume's to_patient gives)
    diameter_mm: float
    label: int  # value in truth["lesions"]


@dataclass
class Case:
    vol: np.ndarray  # HU float32 (z, y, x)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    truth: dict[str, np.ndarray]  # lung_left, lung_right (bool), lesions (int16 labels)
    lesions: list[Lesion] = field(default_factory=list)


def _segments(
    rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, r0: float, depth: int
) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """A tapering binary tree: (start, end, r_start, r_end) capsules."""
    out: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    stack = [(root, direction / np.linalg.norm(direction), r0, 0)]
    while stack:
        p, d, r, k = stack.pop()
        length = max(8.0, 30.0 * 0.78**k * rng.uniform(0.7, 1.3))
        q = p + d * length
        r1 = r * 0.8
        out.append((p, q, r, r1))
        if k + 1 < depth and r1 > 0.45:
            for sign in (-1, 1):
                v = rng.normal(size=3)
                v -= v.dot(d) * d
                v /= np.linalg.norm(v)
                nd = d + sign * v * rng.uniform(0.4, 0.9)
                stack.append((q, nd / np.linalg.norm(nd), r1 * rng.uniform(0.72, 0.85), k + 1))
    return out


def chest(
    *,
    seed: int = 0,
    size: int = 192,
    fov_mm: float = 360.0,
    thickness: float = 2.5,
    z_mm: float = 260.0,
    junction_mm: float = 0.4,
    table: bool = True,
    contrast: bool = False,
    noise: float = 25.0,
    lesions: tuple[tuple[str, float], ...] = (),
    vessel_depth: int = 7,
) -> Case:
    """One chest CT. ``lesions``: (kind, diameter_mm) placed at random valid spots."""
    rng = np.random.default_rng(seed)
    sxy = fov_mm / size
    dzf = min(1.0, thickness)
    sub = max(1, round(thickness / dzf))
    nz = max(4, round(z_mm / thickness))
    nzf = nz * sub
    zf = (np.arange(nzf) + 0.5) * (thickness / sub)  # fine slice centres, mm
    zc = (np.arange(nz) + 0.5) * thickness
    coords = (np.arange(size) - (size - 1) / 2) * sxy
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    z_base, z_apex = 0.12 * z_mm + rng.uniform(-5, 5), 0.97 * z_mm
    z_carina = z_base + 0.62 * (z_apex - z_base)
    body_a, body_b = 160.0 * rng.uniform(0.92, 1.05), 112.0 * rng.uniform(0.92, 1.05)
    lung_cx, lung_ax, lung_by = 62.0, 64.0 * rng.uniform(0.95, 1.0), 82.0
    heart = (15.0, -25.0, z_base + 0.25 * (z_apex - z_base), 58.0, 48.0, 55.0)
    blood = 250.0 if contrast else 40.0
    # airways: trachea from the top to the carina, main bronchi to each hilum, a few branches
    hila = {s: np.array([s * 48.0, 8.0, z_carina - 28.0]) for s in (-1, 1)}
    airway_caps: list[tuple[np.ndarray, np.ndarray, float, float]] = [
        (np.array([0.0, 0.0, z_mm + 5]), np.array([0.0, 0.0, z_carina]), 9.0, 8.5)
    ]
    bronchi_in_lung: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    for s, h in hila.items():
        airway_caps.append((np.array([0.0, 0.0, z_carina]), h, 6.5, 5.0))
        for seg in _segments(rng, h, np.array([s * 1.0, rng.uniform(-0.5, 0.5), -0.6]), 4.0, 4):
            bronchi_in_lung.append(seg)
    vessels: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    for s, h in hila.items():
        for d in ([s, -0.6, 0.5], [s, 0.5, -0.6], [s, 0.2, 0.9], [s, -0.3, -0.9]):
            root = h + np.array([0.0, rng.uniform(-6, 6), rng.uniform(-6, 6)])
            vessels += _segments(rng, root, np.array(d, float), 5.0, vessel_depth)
    ribs = [(z, rng.uniform(-0.3, 0.3)) for z in np.arange(z_base - 20, z_mm, 28.0)]

    def lung_cavity(z: float) -> dict[int, np.ndarray]:
        u = (z - z_base) / (z_apex - z_base)
        if u <= 0 or u >= 1:
            return {-1: np.zeros_like(xx, bool), 1: np.zeros_like(xx, bool)}
        w = min(1.0, np.sqrt((1 - u) / 0.3)) * min(1.0, 0.75 + u)
        hx, hy, hz, ha, hb, hc = heart
        hs = 1 - ((z - hz) / hc) ** 2
        heart_m = (
            ((xx - hx) / (ha * np.sqrt(hs))) ** 2 + ((yy - hy) / (hb * np.sqrt(hs))) ** 2 <= 1
            if hs > 0
            else np.zeros_like(xx, bool)
        )
        med = heart_m | ((xx / 20) ** 2 + ((yy - 78) / 26) ** 2 <= 1)  # heart, spine
        med |= ((xx - 22) / 14) ** 2 + ((yy - 50) / 14) ** 2 <= 1  # descending aorta
        med |= (xx / 11.5) ** 2 + ((yy - 0) / 11.5) ** 2 <= 1  # trachea / oesophagus
        med |= (xx / 9) ** 2 + ((yy - 30) / 9) ** 2 <= 1
        if z > z_carina - 10:
            med |= (np.abs(xx) < 14) & (yy < -30)  # thymus / vessels above the heart, anterior
        out = {}
        for s in (-1, 1):
            ell = ((xx - s * lung_cx) / (lung_ax * w)) ** 2 + (
                yy / (lung_by * (0.6 + 0.4 * w))
            ) ** 2
            out[s] = (ell <= 1) & (s * xx > junction_mm / 2) & ~med
        return out

    vol = np.zeros((nz, size, size), np.float32)
    truth_l = np.zeros((nz, size, size), bool)
    truth_r = np.zeros((nz, size, size), bool)
    lesion_lab = np.zeros((nz, size, size), np.int16)

    def capsule_field(
        caps: list[tuple[np.ndarray, np.ndarray, float, float]], z: float, outer: float = 0.0
    ) -> np.ndarray:
        """Coverage in [0, 1] of capsules (radius + outer) on the plane at z, anti-aliased."""
        cov = np.zeros_like(xx, np.float32)
        for p, q, r0, r1 in caps:
            rmax = max(r0, r1) + outer
            if z < min(p[2], q[2]) - rmax or z > max(p[2], q[2]) + rmax:
                continue
            lo = np.minimum(p[:2], q[:2]) - rmax - sxy
            hi = np.maximum(p[:2], q[:2]) + rmax + sxy
            i0, i1 = np.searchsorted(coords, [lo[1], hi[1]])
            j0, j1 = np.searchsorted(coords, [lo[0], hi[0]])
            if i1 <= i0 or j1 <= j0:
                continue
            X, Y = xx[i0:i1, j0:j1], yy[i0:i1, j0:j1]
            d = q - p
            L2 = float(d.dot(d)) or 1e-6
            t = np.clip(((X - p[0]) * d[0] + (Y - p[1]) * d[1] + (z - p[2]) * d[2]) / L2, 0, 1)
            dist = np.sqrt(
                (X - p[0] - t * d[0]) ** 2 + (Y - p[1] - t * d[1]) ** 2 + (z - p[2] - t * d[2]) ** 2
            )
            rad = r0 + (r1 - r0) * t + outer
            c = np.clip((rad - dist) / sxy + 0.5, 0, 1).astype(np.float32)
            cov[i0:i1, j0:j1] = np.maximum(cov[i0:i1, j0:j1], c)
        return cov

    # lesion placement (mm, patient coordinates; volume z index 0 at the base)
    placed: list[tuple[str, np.ndarray, float, int]] = []
    for k, (kind, diam) in enumerate(lesions, start=1):
        r = diam / 2
        for _ in range(400):
            s = int(rng.choice([-1, 1]))
            z = rng.uniform(
                z_base + 0.15 * (z_apex - z_base) + r, z_apex - 0.15 * (z_apex - z_base) - r
            )
            cav = lung_cavity(z)[s]
            dist_in = ndi.distance_transform_edt(cav) * sxy
            if kind in ("juxtapleural", "mass"):
                depth = r * (0.35 if kind == "mass" else 0.5)
                ring = cav & (np.abs(dist_in - depth) < sxy) & (np.abs(xx) > 35)
                idx = np.argwhere(ring)
                if not len(idx):
                    continue
                i, j = idx[rng.integers(len(idx))]
                c = np.array([coords[j], coords[i], z])
            elif kind == "juxtavascular":
                p, q, r0, _ = vessels[rng.integers(len(vessels))]
                if r0 < 1.0 or r0 > 3.5:
                    continue
                t = rng.uniform(0.3, 0.7)
                a = p + t * (q - p)
                d = (q - p) / (np.linalg.norm(q - p) + 1e-6)
                v = rng.normal(size=3)
                v -= v.dot(d) * d
                c = a + v / np.linalg.norm(v) * (r * 0.8 + r0 * 0.5)
                cav = lung_cavity(c[2])[s]
                dist_in = ndi.distance_transform_edt(cav) * sxy
                i, j = np.searchsorted(coords, c[1]), np.searchsorted(coords, c[0])
                if not (0 < i < size and 0 < j < size) or dist_in[i, j] < r + 4:
                    continue
            else:
                idx = np.argwhere(dist_in > r + 6)
                if not len(idx):
                    continue
                i, j = idx[rng.integers(len(idx))]
                c = np.array([coords[j], coords[i], z])
            if any(np.linalg.norm(c - pc) < (r + pr / 2) + 8 for _, pc, pr, _ in placed):
                continue
            placed.append((kind, c, diam, k))
            break

    pad = np.sqrt((np.abs(xx) / (body_a + 40)) ** 2) <= 1
    for kf in range(nzf):
        z = float(zf[kf])
        img = np.full((size, size), -1000.0, np.float32)
        body = (xx / body_a) ** 2 + (yy / body_b) ** 2 <= 1
        img[body] = -100.0
        inner = (xx / (body_a - 14)) ** 2 + (yy / (body_b - 14)) ** 2 <= 1
        img[inner] = 40.0
        if table:
            ty = body_b + 14.0
            foam = pad & (yy > body_b - 6) & (yy < ty) & ~body
            img[foam] = -850.0
            shell = (np.abs(yy - ty - 25 + 0.0008 * xx**2) < 4) & (np.abs(xx) < 210)
            img[shell] = 300.0
            if kf % 40 < 6:  # straps/cushion rim touching the body on some slices
                img[(np.abs(np.abs(xx) - 90) < 4) & (yy > body_b - 8) & (yy < ty + 30)] = 50.0
        cav = lung_cavity(z)
        # ribs, sternum, spine
        for rz, ph in ribs:
            if abs(z - rz) < 6:
                ang = np.arctan2(yy, xx) + ph
                ring = (
                    np.abs(np.sqrt((xx / (body_a - 20)) ** 2 + (yy / (body_b - 20)) ** 2) - 1)
                    < 0.05
                )
                img[ring & (np.abs(np.sin(ang)) > 0.2) & inner] = 700.0
        img[(xx / 20) ** 2 + ((yy - 78) / 26) ** 2 <= 1] = 400.0
        img[(xx / 12) ** 2 + ((yy - 78) / 18) ** 2 <= 1] = 250.0
        img[(np.abs(xx) < 12) & (np.abs(yy + body_b - 22) < 6)] = 500.0
        img[((xx - 22) / 14) ** 2 + ((yy - 50) / 14) ** 2 <= 1] = blood
        hx, hy, hz, ha, hb, hc = heart
        hs = 1 - ((z - hz) / hc) ** 2
        if hs > 0:
            hm = ((xx - hx) / (ha * np.sqrt(hs))) ** 2 + ((yy - hy) / (hb * np.sqrt(hs))) ** 2 <= 1
            img[hm] = blood
        lungs = cav[-1] | cav[1]
        img[lungs] = -860.0
        # septum: the touching lungs' pleura, thinner than a pixel (partial volume)
        if junction_mm > 0:
            near = ndi.binary_dilation(cav[-1], iterations=2) & ndi.binary_dilation(
                cav[1], iterations=2
            )
            sept = (np.abs(xx) < sxy) & near
            img[sept] += min(1.0, junction_mm / sxy) * (40.0 - img[sept])
        # vessels and bronchi inside the lungs
        vcov = capsule_field(vessels, z)
        img = np.where(lungs, img + vcov * (blood - img), img)
        bw = capsule_field(bronchi_in_lung, z, outer=1.0)
        bl = capsule_field(bronchi_in_lung, z)
        img = np.where(lungs, img + bw * (40.0 - img), img)
        img = np.where(lungs, img + bl * (-1000.0 - img), img)
        aw = capsule_field(airway_caps, z, outer=2.0)
        al = capsule_field(airway_caps, z)
        img = img + aw * (40.0 - img)
        img = img + al * (-1000.0 - img)
        # lesions
        lab = np.zeros((size, size), np.int16)
        for kind, c, diam, k in placed:
            r = diam / 2
            dz = z - c[2]
            if abs(dz) >= r + sxy:
                continue
            d2 = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + dz**2)
            ang = np.arctan2(yy - c[1], xx - c[0])
            rr = r * (1 + (0.08 if kind in ("solid", "mass") else 0.03) * np.sin(3 * ang + k))
            cov = np.clip((rr - d2) / sxy + 0.5, 0, 1)
            side = cav[-1] | cav[1]
            if kind in ("juxtapleural", "mass"):
                side = ndi.binary_dilation(side, iterations=1)
            cov = cov * side
            hu = {"ground_glass": -620.0, "calcified": 600.0}.get(kind, 30.0)
            if kind == "part_solid":
                core = np.clip((0.5 * rr - d2) / sxy + 0.5, 0, 1)
                img = img + cov * (-600.0 - img)
                img = img + core * side * (30.0 - img)
            else:
                img = img + cov * (hu - img)
            if abs(kf % sub - sub // 2) == 0 or sub == 1:
                lab[(cov >= 0.5) & (cav[-1] | cav[1])] = k
        k_out = kf // sub
        vol[k_out] += img / sub
        if kf % sub == sub // 2:
            truth_r[k_out] = cav[-1]
            truth_l[k_out] = cav[1]
            lesion_lab[k_out] = lab
    # correlated noise
    n = rng.normal(0, 1, vol.shape).astype(np.float32)
    n = ndi.gaussian_filter(n, sigma=(0, 0.8, 0.8))
    n *= noise / max(float(n.std()), 1e-6)
    vol += n
    origin = (float(coords[0]), float(coords[0]), float(zc[0]))
    lesion_list = [
        Lesion(kind, (float(c[0]), float(c[1]), float(c[2])), diam, k)
        for kind, c, diam, k in placed
    ]
    # truth convention: lungs include their vessels, bronchi and lesions inside the cavity
    return Case(
        vol,
        (thickness, sxy, sxy),
        origin,
        {"lung_left": truth_l, "lung_right": truth_r, "lesions": lesion_lab},
        lesion_list,
    )
