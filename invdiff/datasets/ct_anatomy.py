"""Anatomical CT phantoms: axial head, thorax and abdomen slices and sagittal spine views, rendered in HU.

Each phantom is drawn in physical coordinates (mm) from a layout of soft-edged shapes (ellipses and
superellipses whose radius wobbles with a few random Fourier modes), painted back to front: air, skin and
subcutaneous fat, muscle, organs and vessels, cortical and trabecular bone, air cavities; then smooth density
gradients, a scanner point-spread function (Gaussian, 0.5-1.2 mm FWHM) and correlated (band-passed) noise of
a few to ~20 HU are added, and the HU map goes to the training scale of ``CT_NORMALISATION``:
``(HU + 1000) / 2000`` clipped to [0, 1]. A ``size x size`` view is rendered at a random pixel spacing
(0.6-4 mm, log-uniform) centred at a random point of the body, so the same source holds 1 mm detail and
whole-body views. Every random number comes from one ``torch.Generator`` per image, seeded from the batch
generator, so a batch is reproduced from the generator's state alone.

HU ranges used (typical unenhanced values from standard radiology teaching tables, e.g. the Hounsfield-unit
tables of CT textbooks and Radiopaedia's "Hounsfield unit" article; written from general knowledge of those
tables, not copied from one; contrast enhancement is drawn with probability 0.4):

    air -1000; lung parenchyma -900 to -750; fat -120 to -70; water 0; CSF 0 to 15; bile / fluid 0 to 25;
    white matter 20 to 32; grey matter 34 to 45; blood 35 to 55 (enhanced arteries 150 to 350);
    muscle 40 to 60; kidney 25 to 40 (enhanced 120 to 200); spleen 40 to 55; liver 50 to 70 (enhanced
    90 to 130); intervertebral disc 60 to 110; calcification 130 to 600; trabecular (cancellous) bone 150 to
    400; skull diploe 300 to 700; cortical bone 900 to 1800 (saturates at 1 on the [-1000, 1000] scale).

    >>> source = CTAnatomySource(size=64, batch=4)
    >>> x = source.batch(torch.Generator().manual_seed(0))      # (4, 1, 64, 64) float32 in [0, 1]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from invdiff.datasets.training import CT_NORMALISATION, TrainingSource, _gaussian_blur

ANATOMIES = ("head", "thorax", "abdomen", "spine")
ANATOMY_PROBS = (0.3, 0.25, 0.25, 0.2)     # "spine": half sagittal columns, half axial views centred on a vertebra
SPACING_RANGE_MM = (0.6, 4.0)


class _Canvas:
    """An HU image on a pixel grid with physical coordinates ``x`` (columns) and ``y`` (rows, posterior or
    inferior = +y), in mm, and the generator every shape draws from."""

    def __init__(self, generator: torch.Generator, x: torch.Tensor, y: torch.Tensor, spacing: float):
        self.g, self.x, self.y, self.spacing = generator, x, y, spacing
        self.hu = torch.full_like(x, -1000.0)
        self.edge = max(0.3 * spacing, 0.25)          # logistic edge width, mm

    def u(self, low: float, high: float) -> float:
        return float(low + (high - low) * torch.rand((), generator=self.g))

    def coin(self, p: float) -> bool:
        return bool(torch.rand((), generator=self.g) < p)

    def wobble(self, amount: float, modes: int = 5) -> list[tuple[int, float, float]]:
        """Random radius modulation ``sum_k a_k cos(k theta + phi_k)``, amplitudes ~ amount / k."""
        return [(k, amount * self.u(0, 1) / k, self.u(0, 2 * math.pi)) for k in range(2, modes + 2)]

    def shape(self, cx, cy, a, b, angle=0.0, wobble=(), p=2.0, edge=None) -> torch.Tensor:
        """Soft mask in [0, 1] of a (super)ellipse ``|x'/a|^p + |y'/b|^p <= r(theta)^p`` with wobbling radius."""
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = self.x - cx, self.y - cy
        xr, yr = (dx * c + dy * s) / a, (-dx * s + dy * c) / b
        rho = (xr.abs().pow(p) + yr.abs().pow(p) + 1e-12).pow(1 / p)
        radius = torch.ones_like(rho)
        if wobble:
            theta = torch.atan2(yr, xr)
            for k, amp, phase in wobble:
                radius = radius + amp * torch.cos(k * theta + phase)
        distance = (rho - radius) * min(a, b)           # approximate signed distance to the boundary, mm
        return torch.sigmoid(-distance / (edge or self.edge))

    def paint(self, mask: torch.Tensor, value) -> None:
        self.hu = self.hu + mask * (value - self.hu)

    def field(self, nodes: int, amplitude: float) -> torch.Tensor:
        """Smooth random field of std ~amplitude over the canvas, ``nodes`` control points across 300 mm."""
        coarse = torch.randn(1, 1, nodes, nodes, generator=self.g)
        span = 150.0
        grid = torch.stack([(self.x / span).clamp(-1, 1), (self.y / span).clamp(-1, 1)], dim=-1)[None]
        return amplitude * F.grid_sample(coarse, grid, mode="bicubic", padding_mode="border",
                                         align_corners=True)[0, 0]

    def texture(self, sigma_mm: float, amplitude: float) -> torch.Tensor:
        """Fine random texture: white noise blurred to ``sigma_mm``, normalised to std ``amplitude``."""
        noise = torch.randn(self.x.shape, generator=self.g)[None, None]
        smooth = _gaussian_blur(noise, max(sigma_mm / self.spacing, 0.3))[0, 0]
        return amplitude * smooth / smooth.std().clamp_min(1e-6)

    def dots(self, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """Union (max) of soft discs (K, 2) centres in mm, (K,) radii in mm -> mask."""
        if centres.shape[0] == 0:
            return torch.zeros_like(self.x)
        out = torch.zeros_like(self.x)
        for chunk in range(0, centres.shape[0], 32):
            c, r = centres[chunk:chunk + 32], radii[chunk:chunk + 32]
            d = torch.sqrt((self.x[None] - c[:, 0, None, None]) ** 2 + (self.y[None] - c[:, 1, None, None]) ** 2)
            out = torch.maximum(out, torch.sigmoid(-(d - r[:, None, None]) / self.edge).amax(dim=0))
        return out


# --------------------------------------------------------------------------------------------- pieces
def _bone(cv: _Canvas, cx, cy, a, b, angle=0.0, *, cortex=None, marrow=None, wobble=(), p=2.0) -> None:
    """A bone cross-section: cortical shell (cortex mm thick) around trabecular bone with texture."""
    cortex = cortex or cv.u(0.8, 2.5)
    cv.paint(cv.shape(cx, cy, a, b, angle, wobble, p), cv.u(900, 1800))
    inner_a, inner_b = max(a - cortex, 0.3), max(b - cortex, 0.3)
    marrow_hu = marrow if marrow is not None else cv.u(150, 400)
    cv.paint(cv.shape(cx, cy, inner_a, inner_b, angle, wobble, p), marrow_hu + cv.texture(0.8, 60.0))


def _vertebra_axial(cv: _Canvas, cx, cy, scale) -> None:
    """Vertebral body, spinal canal with cord, lamina, spinous and transverse processes (posterior = +y)."""
    r = cv.u(14, 22) * scale
    _bone(cv, cx, cy, r * cv.u(1.0, 1.25), r, 0.0, wobble=cv.wobble(0.04, 3), p=cv.u(2.0, 2.6))
    canal_y = cy + r + cv.u(6, 10) * scale
    canal = cv.u(7, 10) * scale
    # Posterior arch: a bony ring around the canal, spinous process going back, transverse processes sideways.
    _bone(cv, cx, canal_y, canal + 3.5 * scale, canal + 3.0 * scale, cortex=1.5, marrow=cv.u(200, 500))
    length = cv.u(18, 30) * scale
    _bone(cv, cx, canal_y + canal + length / 2, cv.u(2.5, 4) * scale, length / 2, cortex=1.2)
    for side in (-1, 1):
        tl = cv.u(12, 25) * scale
        _bone(cv, cx + side * (canal + tl / 2), canal_y - 1.0, tl / 2, cv.u(3, 5) * scale,
              side * cv.u(-0.3, 0.1), cortex=1.2)
    cv.paint(cv.shape(cx, canal_y, canal, canal * 0.9), cv.u(0, 15))          # CSF
    cv.paint(cv.shape(cx, canal_y, canal * 0.55, canal * 0.45), cv.u(30, 40))  # cord


def _body_wall(cv: _Canvas, a, b, wob, *, fat_mm, muscle_mm) -> tuple[float, float]:
    """Skin, subcutaneous fat and a muscle layer inside the body outline; returns the inner semi-axes."""
    cv.paint(cv.shape(0, 0, a, b, 0, wob), cv.u(30, 60))                       # skin
    skin = cv.u(1.5, 3.0)
    fat_field = cv.u(-120, -80) + cv.field(5, 8.0)
    cv.paint(cv.shape(0, 0, a - skin, b - skin, 0, wob), fat_field)
    a2, b2 = a - skin - fat_mm, b - skin - fat_mm
    cv.paint(cv.shape(0, 0, a2, b2, 0, wob), cv.u(40, 60) + cv.texture(1.5, 6.0))
    return a2 - muscle_mm, b2 - muscle_mm


def _ribs(cv: _Canvas, a, b, wob, count, *, skip_front=0.35, skip_back=0.45) -> None:
    """Rib cross-sections along an inner contour, elongated tangentially (front and back left free)."""
    for i in range(count):
        t = 2 * math.pi * (i + cv.u(-0.3, 0.3)) / count
        # t = -pi/2 is anterior (top), +pi/2 posterior.
        if abs(math.remainder(t + math.pi / 2, 2 * math.pi)) < skip_front or \
                abs(math.remainder(t - math.pi / 2, 2 * math.pi)) < skip_back:
            continue
        x, y = a * math.cos(t), b * math.sin(t)
        tangent = math.atan2(b * math.cos(t), -a * math.sin(t))
        _bone(cv, x, y, cv.u(5, 14), cv.u(3, 6), tangent, cortex=cv.u(1.0, 2.0))


def _head(cv: _Canvas, scale: float) -> None:
    a, b = cv.u(66, 80) * scale, cv.u(82, 100) * scale
    wob = cv.wobble(0.03, 4)
    level = ("high", "mid", "mid", "base")[int(cv.u(0, 4))]
    cv.paint(cv.shape(0, 0, a, b, 0, wob), cv.u(20, 50))                      # scalp
    scalp = cv.u(3, 7)
    skull = cv.u(4, 9) * (1.4 if level == "base" else 1.0)
    sa, sb = a - scalp, b - scalp
    _bone(cv, 0, 0, sa, sb, 0, cortex=cv.u(1.2, 2.2), marrow=cv.u(300, 700), wobble=wob)
    ia, ib = sa - skull, sb - skull
    cv.paint(cv.shape(0, 0, ia, ib, 0, wob), cv.u(900, 1600))                  # inner table
    ba, bb = ia - cv.u(1.0, 2.0), ib - cv.u(1.0, 2.0)
    cv.paint(cv.shape(0, 0, ba, bb, 0, wob), cv.u(0, 15))                      # subarachnoid CSF
    if level == "base":
        ba, bb = ba * 0.8, bb * 0.75
    brain_wob = wob + cv.wobble(0.02, 8)
    grey = cv.u(34, 45)
    brain = cv.shape(0, cv.u(-3, 3), ba - 1.0, bb - 1.0, 0, brain_wob)
    cv.paint(brain, grey + cv.field(6, 2.0))
    white = cv.u(20, 32)
    white_mask = cv.shape(0, cv.u(-4, 4), ba * cv.u(0.6, 0.78), bb * cv.u(0.62, 0.8), 0,
                          cv.wobble(0.08, 12))
    if level != "base":
        cv.paint(white_mask, white + cv.field(6, 1.5))
    # Sulci: thin CSF clefts running inwards from the surface.
    for _ in range(int(cv.u(10, 30))):
        t = cv.u(0, 2 * math.pi)
        depth = cv.u(6, 20)
        r_frac = 1 - depth / (2 * min(ba, bb))
        cx, cy = ba * r_frac * math.cos(t), bb * r_frac * math.sin(t)
        cv.paint(cv.shape(cx, cy, depth / 2, cv.u(0.4, 1.0), t + cv.u(-0.3, 0.3)) * brain, cv.u(0, 15))
    cv.paint(cv.shape(0, -bb * 0.5, 0.8, bb * 0.45) * brain, cv.u(5, 15))          # interhemispheric fissure
    if level == "mid":
        # Lateral ventricles (a pair of angled crescents), third ventricle slit.
        off = cv.u(4, 9)
        for side in (-1, 1):
            cv.paint(cv.shape(side * off, cv.u(-8, 2), cv.u(3, 8), cv.u(14, 28), side * cv.u(0.1, 0.4),
                              cv.wobble(0.15, 3)), cv.u(0, 12))
        cv.paint(cv.shape(0, cv.u(8, 14), cv.u(1, 2.5), cv.u(5, 10)), cv.u(0, 12))
        if cv.coin(0.5):                                                          # choroid / pineal calcification
            cv.paint(cv.dots(torch.tensor([[cv.u(-8, 8), cv.u(5, 20)]]), torch.tensor([cv.u(1, 3)])),
                     cv.u(150, 500))
    if cv.coin(0.5):
        cv.paint(cv.shape(0, 0, cv.u(0.6, 1.2), bb * 0.9) * brain, cv.u(50, 200))  # falx
    if level == "base":
        # Orbits (globe, lens, retro-orbital fat) and air in sinuses in front; mastoid air in petrous bone.
        for side in (-1, 1):
            ox, oy = side * cv.u(25, 35) * scale, -b * cv.u(0.62, 0.78)
            cv.paint(cv.shape(ox, oy + 6, cv.u(14, 18), cv.u(16, 22)), cv.u(-110, -80))
            cv.paint(cv.shape(ox, oy, cv.u(10, 12), cv.u(10, 12)), cv.u(0, 20))
            cv.paint(cv.shape(ox, oy - 7, cv.u(3, 4.5), cv.u(1.5, 2.5)), cv.u(90, 130))
            px, py = side * ia * cv.u(0.55, 0.75), bb * cv.u(0.0, 0.3)
            cv.paint(cv.shape(px, py, cv.u(5, 9), cv.u(12, 20), side * cv.u(0.4, 0.9), cv.wobble(0.15)), cv.u(700, 1400))
            cells = torch.stack([px + 3 * torch.randn(8, generator=cv.g), py + 4 * torch.randn(8, generator=cv.g)], 1)
            cv.paint(cv.dots(cells, 0.5 + 1.0 * torch.rand(8, generator=cv.g)), -1000.0)
        sx, sy = cv.u(-3, 3), -b * cv.u(0.35, 0.55)
        cv.paint(cv.shape(sx, sy, cv.u(10, 16), cv.u(10, 18), 0, cv.wobble(0.15)), cv.u(900, 1400))
        cv.paint(cv.shape(sx, sy, cv.u(7, 12), cv.u(7, 14), 0, cv.wobble(0.15)), -1000.0)
        cv.paint(cv.shape(sx, sy, 1.0, cv.u(7, 12)), cv.u(800, 1200))            # septum


def _lungs(cv: _Canvas, ia, ib, scale, heart_x, heart_y, heart_r) -> None:
    lung_hu = cv.u(-900, -780)
    masks = []
    for side in (-1, 1):
        la, lb = ia * cv.u(0.38, 0.46), ib * cv.u(0.75, 0.9)
        lx, ly = side * ia * cv.u(0.45, 0.52), cv.u(-5, 10)
        m = cv.shape(lx, ly, la, lb, side * cv.u(-0.15, 0.15), cv.wobble(0.06, 4), p=cv.u(2.0, 2.8))
        masks.append(m)
    lung = torch.maximum(*masks)
    cv.paint(lung, lung_hu + cv.field(5, 25.0) + cv.field(3, 30.0) * (cv.y / 150))   # dependent density gradient
    # Vessels: many soft dots and short segments, thicker near the hila, inside the lungs only.
    n = int(cv.u(150, 400))
    side = torch.where(torch.rand(n, generator=cv.g) < 0.5, -1.0, 1.0)
    radial = torch.rand(n, generator=cv.g).sqrt()
    angle = 2 * math.pi * torch.rand(n, generator=cv.g)
    centres = torch.stack([side * ia * 0.25 + radial * ia * 0.45 * angle.cos(),
                           radial * ib * 0.85 * angle.sin()], dim=1)
    radii = (0.6 + 4.0 * (1 - radial) ** 2) * torch.exp(0.3 * torch.randn(n, generator=cv.g)) * scale
    vessels = cv.dots(centres, radii)
    for _ in range(int(cv.u(8, 24))):
        s = -1 if cv.coin(0.5) else 1
        t = cv.u(-1.2, 1.2)
        length = cv.u(10, 40)
        vx, vy = s * (ia * 0.2 + length / 2 * abs(math.cos(t))), length / 2 * math.sin(t)
        vessels = torch.maximum(vessels, cv.shape(vx, vy, length / 2, cv.u(1.0, 3.5), t * s))
    cv.paint(vessels * lung, cv.u(20, 60))
    if cv.coin(0.3):                                                              # a nodule
        cv.paint(cv.shape(cv.u(-ia, ia) * 0.6, cv.u(-ib, ib) * 0.6, cv.u(2, 8), cv.u(2, 8), 0, cv.wobble(0.2)) * lung,
                 cv.u(-50, 60))


def _thorax(cv: _Canvas, scale: float, enhanced: bool) -> None:
    a, b = cv.u(140, 185) * scale, cv.u(95, 125) * scale
    wob = cv.wobble(0.04, 4)
    ia, ib = _body_wall(cv, a, b, wob, fat_mm=cv.u(4, 25), muscle_mm=cv.u(6, 14))
    cv.paint(cv.shape(0, 0, ia, ib, 0, wob), cv.u(-110, -70))                 # mediastinal fat background
    spine_y = ib * cv.u(0.55, 0.7)
    heart_x, heart_y, heart_r = cv.u(-15, 5) * scale, -ib * cv.u(0.05, 0.25), cv.u(40, 60) * scale
    _lungs(cv, ia, ib, scale, heart_x, heart_y, heart_r)
    blood = cv.u(150, 350) if enhanced else cv.u(35, 55)
    cv.paint(cv.shape(heart_x, heart_y, heart_r * cv.u(0.9, 1.2), heart_r * cv.u(0.75, 0.95), cv.u(-0.6, -0.2),
                      cv.wobble(0.06, 3)), cv.u(35, 55))                             # pericardium + myocardium
    cv.paint(cv.shape(heart_x + cv.u(-5, 5), heart_y, heart_r * 0.6, heart_r * 0.5, cv.u(-0.6, 0), cv.wobble(0.1, 3)),
             blood)                                                                  # chambers
    cv.paint(cv.shape(cv.u(15, 25) * scale, spine_y - cv.u(20, 30), cv.u(9, 14) * scale, cv.u(9, 14) * scale), blood)
    if cv.coin(0.5):                                                                 # trachea / main bronchi
        cv.paint(cv.shape(cv.u(-5, 5), spine_y - cv.u(35, 50), cv.u(7, 11), cv.u(6, 10)), cv.u(60, 100))
        cv.paint(cv.shape(cv.u(-5, 5), spine_y - cv.u(35, 50), cv.u(5, 9), cv.u(4, 8)), -1000.0)
    for side in (-1, 1):                                                             # paraspinal muscles
        cv.paint(cv.shape(side * cv.u(20, 30) * scale, spine_y + cv.u(25, 35) * scale, cv.u(14, 22) * scale,
                          cv.u(12, 18) * scale, 0, cv.wobble(0.08)), cv.u(40, 60))
    _vertebra_axial(cv, 0, spine_y, scale)
    _ribs(cv, ia + cv.u(2, 6), ib + cv.u(2, 6), wob, int(cv.u(10, 16)))
    _bone(cv, 0, -ib - cv.u(0, 4), cv.u(10, 18), cv.u(4, 7), cortex=1.2)               # sternum


def _abdomen(cv: _Canvas, scale: float, enhanced: bool) -> None:
    a, b = cv.u(130, 185) * scale, cv.u(95, 140) * scale
    wob = cv.wobble(0.05, 4)
    ia, ib = _body_wall(cv, a, b, wob, fat_mm=cv.u(8, 45), muscle_mm=cv.u(6, 12))
    cv.paint(cv.shape(0, 0, ia, ib, 0, wob), cv.u(-110, -70) + cv.field(6, 10.0))   # visceral fat
    spine_y = ib * cv.u(0.5, 0.65)
    # Organs (patient right = image left): liver, spleen, kidneys, stomach, gallbladder.
    liver = (cv.u(100, 130) if enhanced else cv.u(50, 70)) + cv.texture(2.0, 5.0)
    if cv.coin(0.8):
        cv.paint(cv.shape(-ia * cv.u(0.35, 0.5), -ib * cv.u(0.0, 0.2), ia * cv.u(0.4, 0.6), ib * cv.u(0.55, 0.75),
                          cv.u(-0.3, 0.3), cv.wobble(0.1, 4)), liver)
        if cv.coin(0.3):
            cv.paint(cv.shape(-ia * cv.u(0.2, 0.35), ib * cv.u(-0.1, 0.2), cv.u(8, 15), cv.u(12, 25), cv.u(0, 1)),
                     cv.u(0, 25))                                                     # gallbladder
    if cv.coin(0.6):
        cv.paint(cv.shape(ia * cv.u(0.45, 0.65), ib * cv.u(0.1, 0.35), cv.u(25, 45), cv.u(15, 30), cv.u(-1.2, -0.5),
                          cv.wobble(0.08)), cv.u(40, 55) + (60 if enhanced else 0))  # spleen
    kidney = cv.u(120, 200) if enhanced else cv.u(25, 40)
    for side in (-1, 1):
        if cv.coin(0.75):
            kx, ky = side * cv.u(45, 65) * scale, spine_y - cv.u(-5, 10)
            angle = side * cv.u(0.3, 0.7)
            cv.paint(cv.shape(kx, ky, cv.u(20, 30) * scale, cv.u(28, 35) * scale, angle, cv.wobble(0.06)), kidney)
            cv.paint(cv.shape(kx - side * 8, ky, cv.u(5, 10), cv.u(8, 14), angle), cv.u(-100, -60))  # sinus fat
    # Bowel loops: walls with fluid, gas or mottled contents, scattered in the remaining space.
    for _ in range(int(cv.u(6, 16))):
        bx, by = cv.u(-0.7, 0.7) * ia, cv.u(-0.8, 0.4) * ib
        r1, r2 = cv.u(8, 25), cv.u(6, 18)
        angle = cv.u(0, math.pi)
        w = cv.wobble(0.15, 3)
        cv.paint(cv.shape(bx, by, r1, r2, angle, w), cv.u(30, 60))
        kind = cv.u(0, 1)
        inner = cv.shape(bx, by, r1 - 2, r2 - 2, angle, w)
        if kind < 0.35:
            cv.paint(inner, cv.u(0, 30))
        elif kind < 0.65:
            cv.paint(inner, -1000.0)
        else:
            contents = cv.u(-20, 40) + torch.where(cv.texture(3.0, 1.0) > cv.u(0.3, 1.0), -900.0, 0.0)
            cv.paint(inner, contents)
    blood = cv.u(150, 300) if enhanced else cv.u(35, 55)
    cv.paint(cv.shape(cv.u(8, 20), spine_y - cv.u(24, 32), cv.u(8, 13), cv.u(8, 13)), blood)          # aorta
    if cv.coin(0.4):
        cv.paint(cv.dots(torch.tensor([[cv.u(8, 20) + cv.u(-10, 10), spine_y - cv.u(24, 32) + cv.u(-10, 10)]]),
                         torch.tensor([cv.u(1, 2.5)])), cv.u(300, 800))                                 # calcified plaque
    cv.paint(cv.shape(-cv.u(15, 28), spine_y - cv.u(22, 32), cv.u(9, 15), cv.u(6, 12), 0, cv.wobble(0.1)),
             cv.u(90, 160) if enhanced else cv.u(35, 50))                                                # IVC
    for side in (-1, 1):                                                                                 # psoas, paraspinals
        cv.paint(cv.shape(side * cv.u(22, 32) * scale, spine_y - cv.u(-5, 8), cv.u(10, 18), cv.u(12, 20), 0,
                          cv.wobble(0.08)), cv.u(40, 60))
        cv.paint(cv.shape(side * cv.u(22, 32) * scale, spine_y + cv.u(28, 40) * scale, cv.u(16, 24) * scale,
                          cv.u(14, 20) * scale, 0, cv.wobble(0.08)), cv.u(40, 60))
    _vertebra_axial(cv, 0, spine_y, scale * cv.u(1.0, 1.2))
    if cv.coin(0.6):
        _ribs(cv, ia + cv.u(2, 6), ib + cv.u(2, 6), wob, int(cv.u(8, 14)), skip_front=0.9, skip_back=0.6)


def _spine_sagittal(cv: _Canvas, scale: float) -> None:
    """Sagittal view: anterior = -x (left), superior = -y (top); a curved column of vertebrae and discs."""
    curve = cv.u(-0.0015, 0.0015)
    tilt = cv.u(-0.15, 0.15)
    shift = curve * cv.y ** 2 + tilt * cv.y                 # lordosis / kyphosis: the column bends with y
    x_saved = cv.x
    cv.x = cv.x - shift
    a = cv.u(110, 160) * scale
    cv.paint(cv.shape(-a * 0.35, 0, a, 400, 0, (), p=4.0), cv.u(-110, -70) + cv.field(6, 10.0))      # fat / soft tissue
    cv.paint(cv.shape(-a * 0.1, 0, a * 0.55, 400, 0, (), p=4.0), cv.u(30, 55) + cv.texture(2.0, 5.0))  # muscle / organs
    cv.paint(cv.shape(a * 0.62, 0, cv.u(3, 15), 400, 0, (), p=4.0), cv.u(-110, -70))                 # posterior fat
    cv.paint(cv.shape(a * 0.62 + 8, 0, 6, 400, 0, (), p=4.0), -1000.0)                              # air behind the back
    body_w, body_h, disc = cv.u(28, 40) * scale, cv.u(20, 30) * scale, cv.u(6, 11) * scale
    pitch = body_h + disc
    offset = cv.u(0, pitch)
    canal_x = body_w / 2 + cv.u(6, 10)
    blood = cv.u(35, 55) if cv.coin(0.6) else cv.u(150, 300)
    cv.paint(cv.shape(-body_w / 2 - cv.u(12, 20), 0, cv.u(8, 12), 400, 0, (), p=4.0), blood)          # aorta
    for k in range(-8, 9):
        cy = offset + k * pitch
        cv.paint(cv.shape(0, cy + pitch / 2, body_w / 2 + 1, disc / 2 + 1.5, 0, (), p=3.0), cv.u(60, 110))  # disc
        _bone(cv, 0, cy, body_w / 2, body_h / 2, cv.u(-0.05, 0.05), cortex=cv.u(0.8, 1.8), p=cv.u(3.0, 5.0))
        _bone(cv, canal_x + cv.u(20, 35), cy + cv.u(3, 8), cv.u(12, 20), cv.u(4, 7), cv.u(0.2, 0.5), cortex=1.2)
    cv.paint(cv.shape(canal_x, 0, cv.u(6, 9), 400, 0, (), p=4.0), cv.u(0, 15))                        # CSF
    cv.paint(cv.shape(canal_x, 0, cv.u(3, 5), 400, 0, (), p=4.0), cv.u(30, 40))                        # cord
    cv.x = x_saved


# --------------------------------------------------------------------------------------------- render
def render_phantom(generator: torch.Generator, size: int, *, anatomy: str | None = None,
                   spacing_mm: float | None = None, scanner: bool = True) -> tuple[torch.Tensor, dict]:
    """One phantom view ``(size, size)`` float32 on the [0, 1] scale of CT_NORMALISATION, and its description
    (anatomy, spacing_mm, noise_hu, psf_fwhm_mm, enhanced). ``scanner=False``: the same anatomy (the scanner draws
    come after it) without PSF blur and noise, a clean target: a prior trained on noisy targets learns the noise
    texture as image content."""
    cv_u = lambda low, high: float(low + (high - low) * torch.rand((), generator=generator))  # noqa: E731
    if anatomy is None:
        anatomy = ANATOMIES[int(torch.multinomial(torch.tensor(ANATOMY_PROBS), 1, generator=generator))]
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy must be one of {ANATOMIES}, got {anatomy!r}")
    if spacing_mm is None:
        spacing_mm = math.exp(cv_u(math.log(SPACING_RANGE_MM[0]), math.log(SPACING_RANGE_MM[1])))
    scale = cv_u(0.75, 1.1)
    enhanced = cv_u(0, 1) < 0.4
    extent = {"head": (70, 85), "thorax": (150, 105), "abdomen": (150, 110), "spine": (100, 200)}[anatomy]
    fov = size * spacing_mm
    # View centre: anywhere in the body, pulled to the middle when the view is as large as the body.
    pull = [min(1.0, fov / (2 * e)) for e in extent]
    cx = (1 - pull[0]) * cv_u(-0.85, 0.85) * extent[0] * scale
    cy = (1 - pull[1]) * cv_u(-0.85, 0.85) * extent[1] * scale
    sagittal = anatomy == "spine" and cv_u(0, 1) < 0.5
    if sagittal:
        cx = cv_u(-40, 40) if fov < 150 else cv_u(-10, 10)
    elif anatomy == "spine":                                      # axial, centred near the vertebral body
        cx, cy = cv_u(-15, 15), cv_u(40, 100) * scale * (1 - min(1.0, fov / 300))
    margin = 4
    n = size + 2 * margin
    r = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * spacing_mm
    angle = cv_u(-0.12, 0.12)                                     # small patient rotation
    yy, xx = torch.meshgrid(cy + r, cx + r, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    x, y = xx * c - yy * s, xx * s + yy * c
    if cv_u(0, 1) < 0.5 and not sagittal:                    # left-right mirror (no up-down flips)
        x = -x
    cv = _Canvas(generator, x, y, spacing_mm)
    if anatomy == "head":
        _head(cv, scale)
    elif anatomy == "thorax":
        _thorax(cv, scale, enhanced)
    elif anatomy == "abdomen":
        _abdomen(cv, scale, enhanced)
    elif sagittal:
        _spine_sagittal(cv, scale)
    elif cv_u(0, 1) < 0.5:
        _abdomen(cv, scale, enhanced)
    else:
        _thorax(cv, scale, enhanced)
    hu = cv.hu
    # Scanner: PSF blur, then correlated noise (white noise band-passed: FBP noise has little DC and is
    # blurred by the reconstruction kernel), stronger in the body than in the surrounding air.
    psf_fwhm = noise_hu = 0.0
    if scanner:
        body = hu > -500                                             # before the blur
        psf_fwhm = cv_u(0.5, 1.2)
        hu = _gaussian_blur(hu[None, None], psf_fwhm / 2.355 / spacing_mm)[0, 0]
        noise_hu = cv_u(2, 20) / math.sqrt(max(spacing_mm, 0.5))    # larger pixels average more photons
        white = torch.randn(n, n, generator=generator)[None, None]
        fine = _gaussian_blur(white, max(0.5, 0.6 / spacing_mm))
        coarse = _gaussian_blur(white, max(1.0, 2.0 / spacing_mm))
        noise = (fine - 0.7 * coarse)[0, 0]
        noise = noise / noise.std().clamp_min(1e-6)
        hu = hu + noise_hu * noise * torch.where(body, 1.0, 0.5)
    image = ((hu + 1000.0) / 2000.0).clamp(0.0, 1.0)[margin:-margin, margin:-margin]
    return image.float().contiguous(), {"anatomy": anatomy, "sagittal": sagittal, "spacing_mm": spacing_mm, "noise_hu": noise_hu,
                                        "psf_fwhm_mm": psf_fwhm, "enhanced": enhanced}


class CTAnatomySource(TrainingSource):
    """Anatomical CT phantoms (see the module docstring), one generator seed per image; ``(B, 1, size, size)``."""

    name = "ct-anatomy"
    normalisation = CT_NORMALISATION

    def __init__(self, *, channels: int = 1, size: int = 64, batch: int = 16, anatomies=ANATOMIES,
                 scanner: bool = True):
        super().__init__(channels=channels, size=size, batch=batch)
        self.scanner = bool(scanner)
        if not self.scanner:
            self.name = "ct-anatomy:clean"
        if channels != 1:
            raise ValueError(f"ct-anatomy: channels must be 1, got {channels}")
        unknown = set(anatomies) - set(ANATOMIES)
        if unknown:
            raise ValueError(f"ct-anatomy: unknown anatomies {sorted(unknown)}; expected some of {ANATOMIES}")
        self.anatomies = tuple(anatomies)

    def phantom(self, seed: int, **kw) -> tuple[torch.Tensor, dict]:
        """``((1, size, size), info)`` for one seed (``anatomy=``, ``spacing_mm=`` fix those draws)."""
        g = torch.Generator().manual_seed(int(seed))
        if "anatomy" not in kw and self.anatomies != ANATOMIES:
            kw["anatomy"] = self.anatomies[int(torch.randint(len(self.anatomies), (), generator=g))]
        image, info = render_phantom(g, self.size, scanner=self.scanner, **kw)
        return image[None], info

    def batch_with_spacing(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        seeds = torch.randint(0, 2 ** 62, (self.batch_size,), generator=generator).tolist()
        images, spacings = [], []
        for seed in seeds:
            image, info = self.phantom(seed)
            images.append(image)
            spacings.append(info["spacing_mm"])
        return torch.stack(images), torch.tensor(spacings)

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        return self.batch_with_spacing(generator)[0]


# ---- evaluation sets ------------------------------------------------------------------------------------------
def write_phantom_set(path, seeds, *, size: int = 128, scanner: bool = True,
                      spacing_mm: float | None = None) -> list[dict]:
    """Write phantoms of the given generator seeds to ``path`` in the layout of ``data/ct_samples.h5`` (``images``
    (N, size, size) float32 in [0, 1], attribute ``names`` as JSON) plus attribute ``spacing_mm`` (one per image),
    atomically; return the phantoms' descriptions. Training draws its per-image seeds at random from [0, 2^62), so
    small seeds are images the prior has (almost surely) never seen: a tuning or test set of the source."""
    import json

    import h5py
    import numpy as np

    from invdiff.io import atomic_path

    source = CTAnatomySource(size=size, batch=1, scanner=scanner)
    images, infos = [], []
    for seed in seeds:
        image, info = source.phantom(int(seed), **({} if spacing_mm is None else {"spacing_mm": float(spacing_mm)}))
        images.append(image[0].numpy())
        infos.append({"seed": int(seed), **info})
    names = [f"{source.name} seed {i['seed']} ({i['anatomy']}{', sagittal' if i['sagittal'] else ''}, "
             f"{i['spacing_mm']:.2f} mm)" for i in infos]
    with atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as h5:
            h5.create_dataset("images", data=np.stack(images).astype(np.float32))
            h5.attrs["names"] = json.dumps(names)
            h5.attrs["spacing_mm"] = np.array([i["spacing_mm"] for i in infos], dtype=np.float64)
            h5.attrs["invdiff_provenance"] = json.dumps({"source": source.name, "seeds": [int(s) for s in seeds],
                                                         "size": size, "values": CT_NORMALISATION["description"]})
    return infos


def main(argv=None) -> None:
    """``python -m invdiff.datasets.ct_anatomy --write OUT.h5 --seeds 1000-1007 [--size 128] [--clean]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a set of ct-anatomy phantoms (data/ct_samples.h5 layout, "
                                                 "with per-image spacing_mm) for recipes/compare_ct.py --data.")
    parser.add_argument("--write", required=True, help="output h5 file")
    parser.add_argument("--seeds", required=True, help="FIRST-LAST (inclusive) or a comma list")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--spacing-mm", type=float, default=None, help="fix the pixel spacing (default: drawn)")
    parser.add_argument("--clean", action="store_true", help="no scanner blur and noise")
    args = parser.parse_args(argv)
    if "-" in args.seeds:
        first, last = (int(v) for v in args.seeds.split("-"))
        seeds = range(first, last + 1)
    else:
        seeds = [int(v) for v in args.seeds.split(",")]
    for info in write_phantom_set(args.write, seeds, size=args.size, scanner=not args.clean,
                                  spacing_mm=args.spacing_mm):
        print(f"seed {info['seed']}: {info['anatomy']}, {info['spacing_mm']:.2f} mm")


if __name__ == "__main__":
    main()
