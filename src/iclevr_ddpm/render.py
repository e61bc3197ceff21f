"""Synthetic iCLEVR: a seeded scene sampler and a batched analytic ray caster (CPU).

Each scene holds 3 objects added one at a time; rendering it with the first 1, 2
and 3 objects gives the iCLEVR files `CLEVR_train_{scene:06d}_{k}.png`, k = 0, 1, 2.

Every object is one primitive in its local frame, {quadric <= 1} intersected with a
slab box, so each object slot costs one test whatever its shape:
    sphere   q = (x^2+y^2+z^2)/r^2, box unbounded
    cylinder q = (x^2+y^2)/r^2,     box |z| <= r
    cube     no quadric,            box |x|,|y|,|z| <= s
Shading: Lambert + Blinn-Phong, key/fill/back lights, soft shadows from a per-pixel
jittered light sample (averaged by the area downsample), one mirror bounce for metal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .labels import COLORS, MAX_OBJECTS, SHAPES

# CLEVR properties.json sRGB values, in labels.COLORS order.
RGB = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215),
       "green": (29, 105, 20), "brown": (129, 74, 25), "purple": (129, 38, 192),
       "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
SIZES = (0.7, 0.35)  # CLEVR large / small radius
BIG, INF = 1e4, float("inf")


def _camera():
    """CLEVR base_scene.blend camera: rotation (63.56, 0.62, 46.69) deg, 35 mm lens, 32 mm sensor."""
    rx, rz = math.radians(63.559), math.radians(46.692)
    rot_z = np.array([[math.cos(rz), -math.sin(rz), 0], [math.sin(rz), math.cos(rz), 0], [0, 0, 1]])
    fwd = rot_z @ np.array([0.0, math.sin(rx), -math.cos(rx)])
    up = rot_z @ np.array([0.0, math.cos(rx), math.sin(rx)])
    return fwd, up, np.cross(fwd, up), 2 * math.atan(16 / 35)


CAM_POS = np.array([7.358891, -6.925791, 4.958309])
CAM_FWD, CAM_UP, CAM_RIGHT, HFOV = _camera()
KEY_POS = np.array([-1.0, -8.0, 8.0])
FILL_DIR = np.array([0.75, -0.45, 0.45]) / np.linalg.norm([0.75, -0.45, 0.45])
BACK_DIR = np.array([-0.5, 0.8, 0.6]) / np.linalg.norm([-0.5, 0.8, 0.6])


@dataclass
class Scene:
    """objs: up to 3 tuples (shape, colour, metal, radius, x, y, theta), in insertion order."""
    objs: list
    cam_pos: np.ndarray
    key_pos: np.ndarray

    def names(self, k: int) -> list[str]:
        """Object names of the first k objects (iCLEVR label strings)."""
        return [f"{COLORS[c]} {SHAPES[s]}" for s, c, *_ in self.objs[:k]]


def in_view(cam_pos, x: float, y: float, z: float, margin: float = 0.85) -> bool:
    """Whether world point (x, y, z) projects inside the central `margin` of the 4:3 frame."""
    v = np.array([x, y, z]) - cam_pos
    depth, tw = v @ CAM_FWD, math.tan(HFOV / 2)
    return abs(v @ CAM_RIGHT / (depth * tw)) < margin and abs(v @ CAM_UP / (depth * tw * 0.75)) < margin


def _place(rng, objs, used, min_gap, cam_pos):
    """Try to add one visible object not overlapping the others; return it or None."""
    for _ in range(100):
        shape, color = int(rng.integers(3)), int(rng.integers(8))
        if (shape, color) in used:  # iCLEVR never repeats a shape+colour in a scene
            continue
        metal, r = int(rng.integers(2)), SIZES[int(rng.integers(2))]
        if SHAPES[shape] == "cube":
            r /= math.sqrt(2)  # CLEVR shrinks cubes so their diagonal matches
        x, y = rng.uniform(-3, 3, 2)
        theta = rng.uniform(0, 2 * math.pi)
        if not in_view(cam_pos, x, y, r):  # a label must be visible in the image
            continue
        if all(math.hypot(x - o[4], y - o[5]) - r - o[3] >= min_gap for o in objs):
            return (shape, color, metal, r, float(x), float(y), float(theta))
    return None


VISIBILITY_CHUNK = 64  # candidate scenes checked together; fixed, so results depend on the seed only


def _draw_scene(rng, n_objects: int, min_gap: float) -> Scene | None:
    """One scene with camera and light jitter, or None when the objects did not fit."""
    cam = CAM_POS + rng.uniform(-0.5, 0.5, 3)
    key = KEY_POS + rng.uniform(-1.0, 1.0, 3)
    objs, used = [], set()
    for _ in range(n_objects):
        obj = _place(rng, objs, used, min_gap, cam)
        if obj is None:
            return None  # crowded draw: the caller resamples the whole scene
        objs.append(obj)
        used.add(obj[:2])
    return Scene(objs, cam, key)


def sample_scenes(seed: int, n: int, n_objects: int = MAX_OBJECTS, min_gap: float = 0.25,
                  min_visible: float = 0.0) -> list[Scene]:
    """n seeded scenes of n_objects non-overlapping objects, with camera and light jitter.

    Every object must cover at least `min_visible` of the frame once all objects are in
    place (CLEVR's min_pixels_per_object check: 200 of 480x320 pixels = 0.0013), so no
    label names an object hidden behind another. Candidates are checked in fixed chunks,
    so the result depends only on the arguments.
    """
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < n:
        chunk = []
        while len(chunk) < VISIBILITY_CHUNK:
            if (scene := _draw_scene(rng, n_objects, min_gap)) is not None:
                chunk.append(scene)
        if min_visible > 0:
            ok = (visible_fraction(chunk)[:, :n_objects] >= min_visible).all(1)
            chunk = [sc for sc, keep in zip(chunk, ok.tolist()) if keep]
        scenes += chunk
    return scenes[:n]


def visible_fraction(scenes: list[Scene], width: int = 128, height: int = 96) -> torch.Tensor:
    """Share of the width x height frame that each object covers with all objects in place.

    Returns float (B, 3) in [0, 1]; 0 for empty slots.
    """
    P, _, cam, _ = _pack(scenes, MAX_OBJECTS)
    o, d = _camera_rays(cam, height, width)
    tg = torch.where(d[2] < 0, -o[2] / d[2], INF)
    _, hid, _ = intersect(o, d, _slots(P), tmax=tg, want_normal=False)
    return torch.stack([(hid == k).float().mean(1) for k in range(MAX_OBJECTS)], 1)


def _pack(scenes: list[Scene], n_visible: int):
    """Object parameters (B, 3, 14): valid, cx, cy, cz, cos, sin, a_xy, a_z, sx, sy, sz, albedo rgb."""
    P = np.zeros((len(scenes), MAX_OBJECTS, 14), np.float32)
    metal = np.zeros((len(scenes), MAX_OBJECTS), np.float32)
    for b, sc in enumerate(scenes):
        for k, (shape, color, mat, r, x, y, th) in enumerate(sc.objs[:n_visible]):
            name = SHAPES[shape]
            if name == "sphere":
                quad = (1 / r**2, 1 / r**2, BIG, BIG, BIG)
            elif name == "cylinder":
                quad = (1 / r**2, 0.0, BIG, BIG, r)
            else:
                quad = (0.0, 0.0, r, r, r)
            albedo = (np.array(RGB[COLORS[color]]) / 255.0) ** 2.2  # sRGB -> linear
            P[b, k] = [1, x, y, r, math.cos(th), math.sin(th), *quad, *albedo]
            metal[b, k] = mat
    cam = np.stack([s.cam_pos for s in scenes]).astype(np.float32)
    key = np.stack([s.key_pos for s in scenes]).astype(np.float32)
    return [torch.from_numpy(a) for a in (P, metal, cam, key)]


def _slots(P, idx=None):
    """Per-slot parameter columns: (B, 1) to broadcast over pixels, or (N,) gathered per ray."""
    if idx is None:
        return [[P[:, k, j:j + 1] for j in range(P.shape[2])] for k in range(P.shape[1])]
    return [[P[idx, k, j] for j in range(P.shape[2])] for k in range(P.shape[1])]


def _slab_normal(nxs, nys, nzs, ex, ey, ez):
    is_x = (nxs >= nys) & (nxs >= nzs)
    is_y = ~is_x & (nys >= nzs)
    is_z = ~(is_x | is_y)
    return (torch.where(is_x, -torch.sign(ex), 0.0), torch.where(is_y, -torch.sign(ey), 0.0),
            torch.where(is_z, -torch.sign(ez), 0.0))


def intersect(o, d, slots, tmax, want_normal=True, eps=1e-3):
    """Nearest hit of rays o + t d (3-tuples of tensors) with the object slots.

    Returns t (tmax where nothing nearer), slot id (int8, -1 = none) and the world normal.
    """
    ox, oy, oz = o
    dx, dy, dz = d
    best, hid = tmax.clone(), torch.full(dx.shape, -1, dtype=torch.int8)
    nx = ny = nz = torch.zeros_like(dx)
    for k, (valid, cx, cy, cz, c, s, axy, az, sx, sy, sz, *_) in enumerate(slots):
        px, py, pz = ox - cx, oy - cy, oz - cz  # world -> local: rotate by -theta about z
        lx, ly, lz = c * px + s * py, -s * px + c * py, pz
        ex, ey, ez = c * dx + s * dy, -s * dx + c * dy, dz
        t1x, t2x = (-sx - lx) / ex, (sx - lx) / ex
        t1y, t2y = (-sy - ly) / ey, (sy - ly) / ey
        t1z, t2z = (-sz - lz) / ez, (sz - lz) / ez
        nxs, nys, nzs = torch.minimum(t1x, t2x), torch.minimum(t1y, t2y), torch.minimum(t1z, t2z)
        tin = torch.maximum(torch.maximum(nxs, nys), nzs)
        tout = torch.minimum(torch.minimum(torch.maximum(t1x, t2x), torch.maximum(t1y, t2y)),
                             torch.maximum(t1z, t2z))
        # quadric a_xy (x^2 + y^2) + a_z z^2 = 1 along the ray: qa t^2 + qb t + qc = 0
        qa = axy * (ex * ex + ey * ey) + az * ez * ez
        qb = 2 * (axy * (lx * ex + ly * ey) + az * lz * ez)
        qc = axy * (lx * lx + ly * ly) + az * lz * lz - 1
        disc = qb * qb - 4 * qa * qc
        has_q = axy > 0
        sq, inv2a = torch.sqrt(disc.clamp_min(0)), 0.5 / qa.clamp_min(1e-12)
        q0 = torch.where(has_q, (-qb - sq) * inv2a, -INF)
        q1 = torch.where(has_q, (-qb + sq) * inv2a, INF)
        t_in = torch.maximum(tin, q0)
        hit = (t_in <= torch.minimum(tout, q1)) & (t_in > eps) & ~(has_q & (disc < 0))
        hit &= (valid > 0) & (t_in < best)
        best = torch.where(hit, t_in, best)
        hid = torch.where(hit, torch.tensor(k, dtype=torch.int8), hid)
        if want_normal:
            hx, hy, hz = lx + t_in * ex, ly + t_in * ey, lz + t_in * ez
            snx, sny, snz = _slab_normal(nxs, nys, nzs, ex, ey, ez)
            quad = q0 >= tin
            gx, gy = torch.where(quad, axy * hx, snx), torch.where(quad, axy * hy, sny)
            gz = torch.where(quad, az * hz, snz)
            nx = torch.where(hit, c * gx - s * gy, nx)
            ny = torch.where(hit, s * gx + c * gy, ny)
            nz = torch.where(hit, gz, nz)
    inv = torch.rsqrt(nx * nx + ny * ny + nz * nz + 1e-20)
    return best, hid, (nx * inv, ny * inv, nz * inv)


def _light_jitter(H, W, radius):
    """Fixed 4x4 Bayer-ordered disk offsets tiled over the image: soft shadows, deterministic."""
    g = np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]], np.float32)
    r, a = 0.9 * radius * np.sqrt((g + 0.5) / 16), g * 2.39996  # golden angle
    tile = lambda v: torch.from_numpy(np.tile(v, (H // 4 + 1, W // 4 + 1))[:H, :W].reshape(1, -1))
    return tile(np.cos(a) * r), tile(np.sin(a) * r)


def _camera_rays(cam, H, W):
    f, u, r = (torch.tensor(v, dtype=torch.float32) for v in (CAM_FWD, CAM_UP, CAM_RIGHT))
    tw = math.tan(HFOV / 2)
    xs = (torch.arange(W, dtype=torch.float32) + 0.5) / W * 2 - 1
    ys = 1 - (torch.arange(H, dtype=torch.float32) + 0.5) / H * 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    dirs = f + xx[..., None] * tw * r + yy[..., None] * (tw * H / W) * u
    dirs = (dirs / dirs.norm(dim=-1, keepdim=True)).reshape(1, H * W, 3).expand(len(cam), -1, -1)
    d = tuple(dirs[..., i].contiguous() for i in range(3))
    o = tuple(cam[:, i:i + 1].expand(len(cam), H * W) for i in range(3))
    return o, d


KEY_I, FILL_I, BACK_I, AMB, GROUND_ALB = 0.85, 0.20, 0.15, 0.22, 0.32


def _reflections(P, metp, key, hit, d, n):
    """Mirror bounce for metal pixels only (compacted): (batch idx, pixel idx, reflected rgb (N, 3))."""
    bi, pi = (metp > 0).nonzero(as_tuple=True)
    (px, py, pz), (dx, dy, dz), (nx, ny, nz) = hit, d, n
    mn = [v[bi, pi] for v in (nx, ny, nz)]
    md = [v[bi, pi] for v in (dx, dy, dz)]
    ddn = sum(a * b for a, b in zip(md, mn))
    rx, ry, rz = (a - 2 * ddn * b for a, b in zip(md, mn))
    ro = [v[bi, pi] + m * 2e-3 for v, m in zip((px, py, pz), mn)]
    tg = torch.where(rz < 0, -ro[2] / rz, INF)
    tr, rh, (rnx, rny, rnz) = intersect(ro, (rx, ry, rz), _slots(P, bi), tmax=tg)
    rground = (rh < 0) & torch.isfinite(tg)
    rnz = torch.where(rground, 1.0, rnz)
    h = [a + tr * b for a, b in zip(ro, (rx, ry, rz))]
    kv = [key[bi, i] - h[i] for i in range(3)]
    ik = torch.rsqrt(sum(v * v for v in kv))
    rirr = KEY_I * ((rnx * kv[0] + rny * kv[1] + rnz * kv[2]) * ik).clamp_min(0) + AMB + FILL_I * 0.3
    alb = P[:, :, 11:14]
    ralb = torch.gather(alb[bi], 1, rh.long().clamp_min(0)[:, None, None].expand(-1, 1, 3))[:, 0]
    ralb = torch.where(rground.unsqueeze(-1), GROUND_ALB, ralb)
    env = (0.30 + 0.15 * rz.clamp(-1, 1)).unsqueeze(-1).expand(-1, 3)  # grey studio
    refl = torch.where((rground | (rh >= 0)).unsqueeze(-1), ralb * rirr.unsqueeze(-1), env)
    return bi, pi, refl


def render(scenes: list[Scene], n_visible: int = MAX_OBJECTS, size: int = 64,
           width: int = 128, height: int = 96, light_radius: float = 1.0) -> torch.Tensor:
    """Render the first n_visible objects of each scene.

    Returns uint8 (B, 3, size, size): a 4:3 render area-downsampled to a square,
    the way iCLEVR's 320x240 images are squashed to 64x64.
    """
    P, metal, cam, key = _pack(scenes, n_visible)
    B, H, W = len(scenes), height, width
    (ox, oy, oz), (dx, dy, dz) = _camera_rays(cam, H, W)
    slots = _slots(P)
    tg = torch.where(dz < 0, -oz / dz, INF)  # ground plane z = 0
    t, hid, (nx, ny, nz) = intersect((ox, oy, oz), (dx, dy, dz), slots, tmax=tg)
    ground = hid < 0
    nz = torch.where(ground, 1.0, nz)
    px, py = ox + t * dx, oy + t * dy
    pz = torch.where(ground, 0.0, oz + t * dz)
    hidl = hid.long().clamp_min(0)
    albp = torch.gather(P[:, :, 11:14], 1, hidl.unsqueeze(-1).expand(-1, -1, 3))
    albp = torch.where(ground.unsqueeze(-1), GROUND_ALB, albp)
    metp = torch.gather(metal, 1, hidl) * ~ground

    # key light: one jittered point per pixel on a disk -> soft shadows after downsampling
    jx, jy = _light_jitter(H, W, light_radius)
    sv = (key[:, 0:1] + jx - px, key[:, 1:2] + jy - py, key[:, 2:3] - pz)
    sdist = torch.sqrt(sum(v * v for v in sv))
    so = (px + nx * 2e-3, py + ny * 2e-3, pz + nz * 2e-3)
    ts, _, _ = intersect(so, tuple(v / sdist for v in sv), slots, tmax=sdist, want_normal=False)
    vis = (ts >= sdist).float()
    lv = (key[:, 0:1] - px, key[:, 1:2] - py, key[:, 2:3] - pz)
    ldist = torch.sqrt(sum(v * v for v in lv))
    lx, ly, lz = (v / ldist for v in lv)
    ndl = (nx * lx + ny * ly + nz * lz).clamp_min(0)
    fall = ((key * key).sum(1, keepdim=True).sqrt() / ldist).clamp(0.7, 1.3)  # gentle floor gradient
    fdl = (nx * FILL_DIR[0] + ny * FILL_DIR[1] + nz * FILL_DIR[2]).clamp_min(0)
    bdl = (nx * BACK_DIR[0] + ny * BACK_DIR[1] + nz * BACK_DIR[2]).clamp_min(0)
    irr = KEY_I * fall * ndl * vis + FILL_I * fdl + BACK_I * bdl + AMB * (0.65 + 0.35 * nz)
    hv = (lx - dx, ly - dy, lz - dz)  # Blinn-Phong half vector
    ndh = ((nx * hv[0] + ny * hv[1] + nz * hv[2]) * torch.rsqrt(sum(v * v for v in hv))).clamp_min(0)
    col = albp * irr.unsqueeze(-1) + (0.10 * ndh.pow(12) * vis * fall * (1 - metp)).unsqueeze(-1)

    if bool((metp > 0).any()):  # metal: dim diffuse + mirror bounce + sharp highlight
        bi, pi, refl = _reflections(P, metp, key, (px, py, pz), (dx, dy, dz), (nx, ny, nz))
        malb = albp[bi, pi]
        spec = (2.5 * ndh.pow(120) * vis * fall)[bi, pi].unsqueeze(-1)
        col[bi, pi] = 0.12 * malb * irr[bi, pi].unsqueeze(-1) + 1.3 * malb * refl + spec * (0.4 + 0.6 * malb)

    img = col.clamp(0, 1).pow(1 / 2.2).reshape(B, H, W, 3).permute(0, 3, 1, 2)  # linear -> sRGB
    img = F.interpolate(img, size=(size, size), mode="area")
    return (img * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def sample_conditions(seed: int, n: int, min_objects: int, max_objects: int = MAX_OBJECTS) -> list[list[str]]:
    """n seeded condition lists (like test.json) of min..max distinct object names."""
    from .labels import NAMES
    rng = np.random.default_rng(seed)
    return [[NAMES[i] for i in rng.choice(len(NAMES), int(rng.integers(min_objects, max_objects + 1)),
                                          replace=False)] for _ in range(n)]


def write_dataset(out_dir, scenes: int, seed: int, batch_size: int = 32, n_conditions: int = 32,
                  min_visible: float = 0.0, **render_kw) -> dict:
    """Render `scenes` scenes x 3 images in the iCLEVR on-disk layout under out_dir:

    images/CLEVR_train_{scene:06d}_{k}.png, train.json, objects.json, test.json (1-3
    objects) and new_test.json (2-3 objects). Returns {"images": N, "seconds": s}.
    """
    import time
    from pathlib import Path

    from PIL import Image
    from tqdm import tqdm

    from .io import save_json
    from .labels import write_objects

    out, t0 = Path(out_dir), time.perf_counter()
    (out / "images").mkdir(parents=True, exist_ok=True)
    all_scenes, train = sample_scenes(seed, scenes, min_visible=min_visible), {}
    with tqdm(total=3 * scenes, desc="render", unit="img") as bar:
        for start in range(0, scenes, batch_size):
            chunk = all_scenes[start:start + batch_size]
            for k in range(MAX_OBJECTS):
                imgs = render(chunk, n_visible=k + 1, **render_kw).permute(0, 2, 3, 1).numpy()
                for j, (sc, img) in enumerate(zip(chunk, imgs)):
                    name = f"CLEVR_train_{start + j:06d}_{k}.png"
                    Image.fromarray(img).save(out / "images" / name)
                    train[name] = sc.names(k + 1)
                bar.update(len(chunk))
    save_json(train, out / "train.json")
    write_objects(out / "objects.json")
    save_json(sample_conditions(seed + 1, n_conditions, 1), out / "test.json")
    save_json(sample_conditions(seed + 2, n_conditions, 2), out / "new_test.json")
    seconds = time.perf_counter() - t0
    print(f"rendered {len(train)} images in {seconds:.1f} s ({len(train) / seconds:.0f} images/s)")
    return {"images": len(train), "seconds": seconds}
