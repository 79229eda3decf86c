"""The world's scenes: random scene sampling and what a viewer sees of a rendered scene.

:func:`sample_scene` draws a :class:`~perceptio_core.world.render.Scene` (camera, light, backdrop,
a few objects standing on the ground and optionally a *crowd*: a cluster of small same-coloured
balls or cubes sharing ``group`` 0) for :func:`~perceptio_core.world.render.render`.
:func:`entities` reduces a rendered scene to the objects a viewer sees (:class:`Entity`: shape,
colour, size class, visible and silhouette pixels, visible centroid, depth), the truth every
annotation, expression, caption and question of the world is made from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perceptio_core.world.render import (
    GROUND_COLOURS,
    LABEL_OBJECT0,
    PALETTE,
    SHAPES,
    WALL_COLOURS,
    Camera,
    Render,
    Scene,
    SceneObject,
)

COLOURS: tuple[str, ...] = tuple(PALETTE)


def sample_scene(rng: np.random.Generator, width: int, height: int, n_min: int, n_max: int,
                 crowd: bool) -> Scene:
    """A random scene: camera, light, backdrop and ``n_min..n_max`` objects (+ a crowd cluster)."""
    focal = width * float(rng.uniform(0.95, 1.1))
    cam = Camera(width, height, focal, float(rng.uniform(1.4, 1.8)), math.radians(rng.uniform(6, 12)))
    wall_z = float(rng.uniform(16.0, 26.0))
    wall_h = float(rng.uniform(3.0, 7.0))
    lx = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.8))
    light = np.array([lx, rng.uniform(0.6, 1.0), -rng.uniform(0.2, 0.6)])
    light /= np.linalg.norm(light)
    ground = str(rng.choice(list(GROUND_COLOURS)))
    wall = str(rng.choice(list(WALL_COLOURS)))
    z_max = min(15.0, wall_z - 3.0)

    objects: list[SceneObject] = []

    def free(x: float, z: float, r: float) -> bool:
        return all(math.hypot(x - o.x, z - o.z) >= r + o.radius + 0.15 for o in objects)

    def in_view(obj: SceneObject) -> bool:
        u, v, zc = cam.project(np.array([[obj.x, 0.0, obj.z], obj.centre]))
        return bool(zc.min() > 1.0 and 0.06 * width <= u[1] <= 0.94 * width and v[0] <= height - 1)

    n = int(rng.integers(n_min, n_max + 1))
    for _ in range(n):
        for _try in range(60):
            shape = str(rng.choice(SHAPES))
            colour = str(rng.choice(COLOURS))
            large = bool(rng.random() < 0.5)
            radius = float(rng.uniform(0.5, 0.7) if large else rng.uniform(0.26, 0.36))
            z = float(math.exp(rng.uniform(math.log(3.4), math.log(z_max))))
            u = float(rng.uniform(0.08, 0.92)) * width
            x = (u - width / 2.0) / focal * z
            yaw = float(rng.uniform(0.0, math.pi / 2)) if shape == "box" else 0.0
            obj = SceneObject(shape, colour, "large" if large else "small", x, z, radius, yaw)
            if free(x, z, radius) and in_view(obj):
                objects.append(obj)
                break
    if crowd:
        shape = str(rng.choice(["ball", "box"]))
        colour = str(rng.choice(COLOURS))
        for _try in range(40):
            cz = float(rng.uniform(4.0, z_max))
            cx = (float(rng.uniform(0.15, 0.85)) * width - width / 2.0) / focal * cz
            if free(cx, cz, 0.7):
                break
        else:
            cx = cz = None  # no room for a crowd in this scene
        if cx is not None:
            members: list[SceneObject] = []
            size = int(rng.integers(4, 7))
            for _try in range(60):
                if len(members) >= size:
                    break
                r = float(rng.uniform(0.12, 0.17))
                mx, mz = cx + float(rng.uniform(-0.5, 0.5)), cz + float(rng.uniform(-0.5, 0.5))
                yaw = float(rng.uniform(0.0, math.pi / 2)) if shape == "box" else 0.0
                m = SceneObject(shape, colour, "small", mx, mz, r, yaw, group=0)
                if free(mx, mz, r) and in_view(m):
                    objects.append(m)
                    members.append(m)
    return Scene(cam, tuple(objects), (float(light[0]), float(light[1]), float(light[2])), ground,
                 wall, wall_z, wall_h)


@dataclass
class Entity:
    """What a viewer sees of one object: the basis of expressions, captions and questions."""

    k: int  # index into scene.objects
    shape: str
    color: str
    size: str
    group: int  # the crowd it belongs to (-1: none)
    visible: int  # visible pixels
    amodal: int  # unoccluded silhouette pixels
    cx: float  # visible centroid (pixels)
    cy: float
    depth: float  # z-depth of the object's centre (metres)

    @property
    def fraction(self) -> float:
        return self.visible / max(self.amodal, 1)


def entities(scene: Scene, r: Render) -> list[Entity]:
    """Every object of ``scene`` with at least one visible pixel in its render ``r``."""
    out: list[Entity] = []
    if not scene.objects:
        return out
    _, _, depths = scene.camera.project(np.stack([o.centre for o in scene.objects]))
    for k, obj in enumerate(scene.objects):
        ys, xs = np.nonzero(r.label == LABEL_OBJECT0 + k)
        if len(xs) == 0:
            continue
        out.append(Entity(k, obj.shape, obj.color, obj.size, obj.group, len(xs), r.amodal_pixels[k],
                          float(xs.mean() + 0.5), float(ys.mean() + 0.5), float(depths[k])))
    return out


def min_ann_pixels(width: int, height: int) -> int:
    """Smallest visible area (pixels) that gets a COCO annotation."""
    return max(8, int(0.0015 * width * height))
