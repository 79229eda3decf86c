"""Ray-cast renderer of the synthetic world's scenes (the offline stand-in for SPEC §5's photos).

A scene is a ground plane seen by a pinhole camera at eye height, pitched slightly down, a far wall
and sky behind it, and a few solid objects (ball, box, cylinder, cone) standing on the ground. Each
pixel's ray is intersected analytically with every surface and the nearest hit wins (a per-pixel
z-buffer: the exact version of painter's algorithm, so occlusion and the visible part of every
object are right at every pixel). What comes out:

- ``depth``: true z-depth in metres (distance along the optical axis), float32 [H, W]: it grows
  towards the horizon on the ground, is ``wall_z``-ish on the far wall and :data:`SKY_DEPTH` in the
  sky;
- ``label``: the surface seen at each pixel, int32 [H, W]: :data:`LABEL_SKY`, :data:`LABEL_WALL`,
  :data:`LABEL_GROUND`, or ``LABEL_OBJECT0 + k`` for object ``k``;
- ``image``: uint8 RGB [H, W, 3], rendered at ``supersample`` x the resolution and box-filtered down
  (soft edges, as in a photograph). Depth cues a small network can learn: perspective (objects
  farther away are smaller and higher in the frame), a ground checkerboard whose tiles shrink towards
  the horizon, contact shadows, Lambert shading from one light and a light distance haze.

Everything is numpy, deterministic given the scene (the only randomness is the pixel noise, drawn
from the ``numpy.random.Generator`` passed in). The masks are written as COCO polygons or RLE by
:mod:`perceptio_core.data.masks`; HardBLINK's point markers are drawn by
:mod:`perceptio_core.data.markers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SKY_DEPTH = 60.0  # metres: the depth given to sky pixels (beyond the far wall at 16-26 m)

LABEL_SKY = 0
LABEL_WALL = 1
LABEL_GROUND = 2
LABEL_OBJECT0 = 3  # object k is labelled LABEL_OBJECT0 + k

SHAPES = ("ball", "box", "cylinder", "cone")

# Named palette (linear-ish sRGB in [0, 1]); names are the words the expressions use.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.82, 0.12, 0.10),
    "green": (0.14, 0.62, 0.20),
    "blue": (0.12, 0.26, 0.85),
    "yellow": (0.93, 0.82, 0.10),
    "purple": (0.55, 0.18, 0.68),
    "orange": (0.97, 0.50, 0.06),
    "white": (0.93, 0.93, 0.91),
}

GROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    "grey": (0.50, 0.50, 0.48),
    "sandy": (0.64, 0.58, 0.46),
    "brown": (0.46, 0.40, 0.33),
    "slate": (0.42, 0.45, 0.48),
}
WALL_COLOURS: dict[str, tuple[float, float, float]] = {
    "stone": (0.74, 0.72, 0.68),
    "beige": (0.76, 0.69, 0.57),
    "blue-grey": (0.60, 0.63, 0.67),
}
SKY_HORIZON = np.array([0.80, 0.86, 0.95])
SKY_ZENITH = np.array([0.42, 0.60, 0.90])
HAZE = np.array([0.80, 0.84, 0.90])


@dataclass(frozen=True)
class Camera:
    """Pinhole camera at ``(0, eye_height, 0)`` looking along +z, pitched down by ``pitch`` radians.

    World axes: x right, y up, z forward; the ground is ``y = 0``. ``focal`` is in pixels.
    """

    width: int
    height: int
    focal: float
    eye_height: float
    pitch: float

    @property
    def origin(self) -> np.ndarray:
        return np.array([0.0, self.eye_height, 0.0])

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(right, up, forward) unit vectors of the camera in world coordinates."""
        s, c = math.sin(self.pitch), math.cos(self.pitch)
        return np.array([1.0, 0.0, 0.0]), np.array([0.0, c, s]), np.array([0.0, -s, c])

    def rays(self, supersample: int = 1) -> np.ndarray:
        """World ray directions through pixel (sub-)centres, [H*s, W*s, 3], camera-z component 1.

        With camera-z component 1, the ray parameter ``t`` of a hit *is* its z-depth.
        """
        s = supersample
        u = (np.arange(self.width * s) + 0.5) / s
        v = (np.arange(self.height * s) + 0.5) / s
        xc = (u - self.width / 2.0) / self.focal  # [Ws]
        yc = -(v - self.height / 2.0) / self.focal  # [Hs]
        r, up, f = self.basis()
        return (
            xc[None, :, None] * r[None, None, :]
            + yc[:, None, None] * up[None, None, :]
            + f[None, None, :]
        )

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World points [N, 3] -> (u, v, z_depth), each [N]; u, v in pixels (x right, y down)."""
        r, up, f = self.basis()
        rel = np.asarray(pts, dtype=np.float64) - self.origin
        xc, yc, zc = rel @ r, rel @ up, rel @ f
        zs = np.where(zc > 1e-6, zc, 1e-6)
        return self.width / 2.0 + self.focal * xc / zs, self.height / 2.0 - self.focal * yc / zs, zc


@dataclass(frozen=True)
class SceneObject:
    """A solid standing on the ground at ``(x, z)``. ``radius`` is its footprint radius (metres).

    ``size`` is the physical size class ("small" / "large") the expressions may use; ``group`` is
    the crowd it belongs to (-1: none).
    """

    shape: str
    color: str
    size: str
    x: float
    z: float
    radius: float
    yaw: float = 0.0
    group: int = -1

    @property
    def height(self) -> float:
        """Top of the object above the ground (metres)."""
        r = self.radius
        return {"ball": 2 * r, "box": 1.6 * r, "cylinder": 2.2 * r, "cone": 2.4 * r}[self.shape]

    @property
    def centre(self) -> np.ndarray:
        return np.array([self.x, self.height / 2.0, self.z])

    def bounds(self) -> np.ndarray:
        """The 8 corners of a world box that encloses the object, [8, 3]."""
        r, h = self.radius * 1.15, self.height  # a yawed box's corners reach 0.8 * sqrt(2) * radius
        return np.array(
            [[self.x + sx * r, y, self.z + sz * r] for sx in (-1, 1) for y in (0.0, h) for sz in (-1, 1)]
        )


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image."""

    camera: Camera
    objects: tuple[SceneObject, ...]
    light: tuple[float, float, float]  # unit vector towards the light
    ground: str  # a GROUND_COLOURS name
    wall: str  # a WALL_COLOURS name
    wall_z: float  # world z of the far wall (metres)
    wall_height: float
    tile: float = 1.0  # ground checker tile size (metres)


@dataclass
class Render:
    """A rendered scene: ``image`` uint8 [H, W, 3], ``depth`` float32 [H, W] (metres), ``label``
    int32 [H, W], and per object its unoccluded silhouette area in pixels (``amodal_pixels``)."""

    image: np.ndarray
    depth: np.ndarray
    label: np.ndarray
    amodal_pixels: list[int] = field(default_factory=list)

    def visible_mask(self, k: int) -> np.ndarray:
        """The visible part of object ``k`` after occlusion, uint8 [H, W] in {0, 1}."""
        return (self.label == LABEL_OBJECT0 + k).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Ray / surface intersections. Each takes the ray origin O [3] and directions D [M, 3] and returns
# (t [M] with inf on a miss, normals [M, 3]).
# --------------------------------------------------------------------------------------------


def _hit_sphere(obj: SceneObject, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = np.array([obj.x, obj.radius, obj.z])
    oc = o - c
    a = np.einsum("ij,ij->i", d, d)
    b = d @ oc
    cc = oc @ oc - obj.radius**2
    disc = b * b - a * cc
    ok = disc >= 0
    t = np.full(len(d), np.inf)
    t[ok] = (-b[ok] - np.sqrt(disc[ok])) / a[ok]
    t[t <= 0] = np.inf
    p = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    return t, (p - c) / obj.radius


def _rot_y(v: np.ndarray, ang: float) -> np.ndarray:
    c, s = math.cos(ang), math.sin(ang)
    out = v.copy()
    out[..., 0] = c * v[..., 0] + s * v[..., 2]
    out[..., 2] = -s * v[..., 0] + c * v[..., 2]
    return out


def _hit_box(obj: SceneObject, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    half = np.array([0.8 * obj.radius, obj.height / 2.0, 0.8 * obj.radius])
    c = np.array([obj.x, obj.height / 2.0, obj.z])
    lo = _rot_y((o - c)[None, :], -obj.yaw)[0]
    ld = _rot_y(d, -obj.yaw)
    ld = np.where(np.abs(ld) < 1e-12, 1e-12, ld)
    t1 = (-half - lo) / ld
    t2 = (half - lo) / ld
    tnear = np.minimum(t1, t2)
    tfar = np.maximum(t1, t2)
    axis = np.argmax(tnear, axis=1)
    tmin = tnear[np.arange(len(d)), axis]
    tmax = tfar.min(axis=1)
    ok = (tmax >= tmin) & (tmin > 0)
    t = np.where(ok, tmin, np.inf)
    n = np.zeros_like(ld)
    n[np.arange(len(d)), axis] = -np.sign(ld[np.arange(len(d)), axis])
    return t, _rot_y(n, obj.yaw)


def _hit_cylinder(obj: SceneObject, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rc, hc = 0.8 * obj.radius, obj.height
    ox, oy, oz = o[0] - obj.x, o[1], o[2] - obj.z
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    a = np.maximum(dx * dx + dz * dz, 1e-12)
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - rc * rc
    disc = b * b - a * c
    ok = disc >= 0
    ts = np.full(len(d), np.inf)
    ts[ok] = (-b[ok] - np.sqrt(disc[ok])) / a[ok]
    ys = oy + ts * dy
    ts[(ts <= 0) | (ys < 0) | (ys > hc) | ~np.isfinite(ys)] = np.inf
    dy_safe = np.where(np.abs(dy) < 1e-12, -1e-12, dy)
    tt = (hc - oy) / dy_safe
    px, pz = ox + tt * dx, oz + tt * dz
    tt[(tt <= 0) | (px * px + pz * pz > rc * rc)] = np.inf
    top = tt < ts
    t = np.where(top, tt, ts)
    p = np.where(np.isfinite(t), t, 0.0)
    n = np.stack([(ox + p * dx) / rc, np.zeros_like(p), (oz + p * dz) / rc], axis=1)
    n[top] = (0.0, 1.0, 0.0)
    return t, n


def _hit_cone(obj: SceneObject, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rc, hc = obj.radius, obj.height
    k2 = (rc / hc) ** 2
    ox, oy, oz = o[0] - obj.x, o[1], o[2] - obj.z
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    w = hc - oy
    a = dx * dx + dz * dz - k2 * dy * dy
    b = ox * dx + oz * dz + k2 * w * dy
    c = ox * ox + oz * oz - k2 * w * w
    a = np.where(np.abs(a) < 1e-12, 1e-12, a)
    disc = b * b - a * c
    ok = disc >= 0
    sq = np.sqrt(np.where(ok, disc, 0.0))
    r1, r2 = (-b - sq) / a, (-b + sq) / a
    lo, hi = np.minimum(r1, r2), np.maximum(r1, r2)
    t = np.full(len(d), np.inf)
    for cand in (hi, lo):  # the lower root wins where both are valid
        y = oy + cand * dy
        valid = ok & (cand > 0) & (y >= 0) & (y <= hc)
        t = np.where(valid, cand, t)
    p = np.where(np.isfinite(t), t, 0.0)
    px, py, pz = ox + p * dx, oy + p * dy, oz + p * dz
    n = np.stack([px, k2 * (hc - py), pz], axis=1)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    return t, n


_HIT = {"ball": _hit_sphere, "box": _hit_box, "cylinder": _hit_cylinder, "cone": _hit_cone}


def _screen_rect(cam: Camera, obj: SceneObject, s: int) -> tuple[int, int, int, int]:
    """Pixel rectangle (x0, x1, y0, y1) at supersample ``s`` that contains the object's image."""
    u, v, zc = cam.project(obj.bounds())
    if np.any(zc <= 0.05):
        return 0, cam.width * s, 0, cam.height * s
    x0 = max(0, int(math.floor((u.min() - 1) * s)))
    x1 = min(cam.width * s, int(math.ceil((u.max() + 1) * s)))
    y0 = max(0, int(math.floor((v.min() - 1) * s)))
    y1 = min(cam.height * s, int(math.ceil((v.max() + 1) * s)))
    return x0, x1, y0, y1


def _trace(scene: Scene, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Cast one ray per (sub-)pixel: (t [Hs, Ws], label, normals [Hs, Ws, 3], rays, amodal areas)."""
    cam = scene.camera
    d = cam.rays(s)  # [Hs, Ws, 3]
    o = cam.origin
    hs, ws = d.shape[:2]
    dy, dz = d[..., 1], d[..., 2]
    # far wall (plane z = wall_z), sky above it
    t_wall = scene.wall_z / np.maximum(dz, 1e-9)
    y_wall = o[1] + t_wall * dy
    t = np.where(y_wall <= scene.wall_height, t_wall, SKY_DEPTH)
    label = np.where(y_wall <= scene.wall_height, LABEL_WALL, LABEL_SKY).astype(np.int32)
    # ground plane y = 0 in front of the wall
    t_ground = np.where(dy < 0, o[1] / np.maximum(-dy, 1e-12), np.inf)
    ground = t_ground < np.minimum(t, t_wall)
    t = np.where(ground, t_ground, t)
    label[ground] = LABEL_GROUND
    normals = np.zeros((hs, ws, 3))
    normals[..., 1] = 1.0
    amodal: list[int] = []
    for k, obj in enumerate(scene.objects):
        x0, x1, y0, y1 = _screen_rect(cam, obj, s)
        if x1 <= x0 or y1 <= y0:
            amodal.append(0)
            continue
        sub = d[y0:y1, x0:x1].reshape(-1, 3)
        tk, nk = _HIT[obj.shape](obj, o, sub)
        tk = tk.reshape(y1 - y0, x1 - x0)
        amodal.append(int(np.isfinite(tk).sum()))
        win = tk < t[y0:y1, x0:x1]
        t[y0:y1, x0:x1] = np.where(win, tk, t[y0:y1, x0:x1])
        label[y0:y1, x0:x1][win] = LABEL_OBJECT0 + k
        normals[y0:y1, x0:x1][win] = nk.reshape(y1 - y0, x1 - x0, 3)[win]
    return t, label, normals, d, amodal


def _shade(scene: Scene, t: np.ndarray, label: np.ndarray, normals: np.ndarray, d: np.ndarray,
           s: int, rng: np.random.Generator) -> np.ndarray:
    """Colour every (sub-)pixel, float [Hs, Ws, 3] in [0, 1]. Works on the flat pixels of each
    surface kind, so the cost follows the pixels a surface covers."""
    cam = scene.camera
    light = np.asarray(scene.light)
    hs, ws = t.shape
    o = cam.origin
    tf = np.where(np.isfinite(t), t, SKY_DEPTH).reshape(-1)
    lab = label.reshape(-1)
    dd = d.reshape(-1, 3)
    nn = normals.reshape(-1, 3)
    # sky: gradient with elevation (ray y over its length, per image row)
    elev = np.clip(d[:, 0, 1] / np.linalg.norm(d[:, 0], axis=-1) * 3.0, 0.0, 1.0)  # [Hs]
    sky_rows = SKY_HORIZON[None, :] * (1 - elev[:, None]) + SKY_ZENITH[None, :] * elev[:, None]
    rgb = np.repeat(sky_rows[:, None, :], ws, axis=1).reshape(-1, 3)

    def fade(idx: np.ndarray) -> np.ndarray:
        """Texture contrast: tiles fade out below a few pixels (no aliasing near the horizon)."""
        tile_px = cam.focal * s * scene.tile / np.maximum(tf[idx], 1e-6)
        return np.clip((tile_px - 3.0 * s) / (6.0 * s), 0.0, 1.0)

    # ground: checkerboard, Lambert, contact shadows
    g = np.flatnonzero(lab == LABEL_GROUND)
    if len(g):
        p = o + tf[g, None] * dd[g]
        par = (np.floor(p[:, 0] / scene.tile) + np.floor(p[:, 2] / scene.tile)) % 2
        shade = (1.0 + 0.13 * (2 * par - 1) * fade(g)) * (0.45 + 0.55 * max(light[1], 0.0))
        lx, lz = -light[0] / max(light[1], 0.2), -light[2] / max(light[1], 0.2)
        for obj in scene.objects:
            cx, cz = obj.x + 0.35 * obj.height * lx, obj.z + 0.35 * obj.height * lz
            d2 = (p[:, 0] - cx) ** 2 + (p[:, 2] - cz) ** 2
            near = d2 < (4.0 * obj.radius) ** 2
            shade[near] *= 1.0 - 0.5 * np.exp(-d2[near] / (1.15 * obj.radius) ** 2)
        rgb[g] = np.asarray(GROUND_COLOURS[scene.ground])[None, :] * shade[:, None]
    w = np.flatnonzero(lab == LABEL_WALL)
    if len(w):
        y = o[1] + tf[w] * dd[w, 1]
        band = (np.floor(y / 0.6) % 2) * 2 - 1
        rgb[w] = np.asarray(WALL_COLOURS[scene.wall])[None, :] * (0.85 + 0.05 * band * fade(w))[:, None]
    objs = np.flatnonzero(lab >= LABEL_OBJECT0)
    if len(objs):
        which = lab[objs] - LABEL_OBJECT0
        lam = np.clip(nn[objs] @ light, 0.0, 1.0)
        base = np.array([PALETTE[ob.color] for ob in scene.objects])[which]
        col = base * (0.38 + 0.62 * lam)[:, None]
        balls = np.array([ob.shape == "ball" for ob in scene.objects])[which]
        if balls.any():  # a small highlight on balls
            bi = objs[balls]
            view = -dd[bi] / np.linalg.norm(dd[bi], axis=1, keepdims=True)
            half = light[None, :] + view
            half /= np.linalg.norm(half, axis=1, keepdims=True)
            col[balls] += 0.25 * np.clip(np.einsum("ij,ij->i", nn[bi], half), 0, 1)[:, None] ** 24
        rgb[objs] = col
    # distance haze (aerial perspective), none on the sky itself
    solid = np.flatnonzero(lab != LABEL_SKY)
    a = (0.45 * (1.0 - np.exp(-tf[solid] / 45.0)))[:, None]
    rgb[solid] = rgb[solid] * (1 - a) + HAZE[None, :] * a
    rgb = rgb.reshape(hs, ws, 3) + rng.normal(0.0, 0.012, size=(hs, ws, 3))
    return np.clip(rgb, 0.0, 1.0)


def render(scene: Scene, rng: np.random.Generator, supersample: int = 2) -> Render:
    """Render ``scene``: depth and labels at pixel centres, colour supersampled and box-filtered.

    ``rng`` draws only the pixel noise. Returns a :class:`Render` at the camera's resolution.
    """
    cam = scene.camera
    t1, label, _, _, amodal = _trace(scene, 1)
    depth = np.where(np.isfinite(t1), t1, SKY_DEPTH).astype(np.float32)
    ts, labs, ns, ds, _ = _trace(scene, supersample)
    rgb = _shade(scene, ts, labs, ns, ds, supersample, rng)
    s = supersample
    rgb = rgb.reshape(cam.height, s, cam.width, s, 3).mean(axis=(1, 3))
    image = np.round(rgb * 255.0).astype(np.uint8)
    return Render(image=image, depth=depth, label=label, amodal_pixels=amodal)
