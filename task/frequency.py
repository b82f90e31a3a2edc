"""Frequency-domain augmentations of pixel-space images (CLIP-Fed's "frequency analysis" step).

CLIP-Fed (arXiv 2508.10315) augments its server data set "with frequency analysis" to cover diverse
triggers; only the abstract is public, so the three augmentations here are [INFERRED] (see
docs/results/clipfed.md and /work/shared/specs/algorithms.md §3 O3):

- `hf_noise`: Gaussian noise on the orthonormal 2-D DCT coefficients of the HIGH band only
  (normalised radial DCT frequency ρ = sqrt((u/H)² + (v/W)²) >= cutoff); low band untouched.
- `amp_mix`: FFT amplitude-spectrum mixing with another image of the batch, in the HIGH band only
  (radius of the centred frequency >= cutoff, in cycles per pixel); the phase and the low band of
  the image are kept, so the result stays real (the band mask is symmetric under f -> -f).
- `patch`: a small square patch whose content is high-pass (random values with the DCT low band
  removed, so zero mean) added at a random position: trigger-like local high-frequency artefacts.
  Only the pixels inside the patch change.

All functions take float NCHW tensors in [0, 1] and a `torch.Generator` (reproducible). The final
clamp to [0, 1] is the only step that can leak into other bands, and only at saturated pixels.
"""

from __future__ import annotations

import math

import torch

FREQUENCY_AUGMENTATIONS = ("hf_noise", "amp_mix", "patch")

# ---- defaults (conf/strategy/clipfed.yaml, server_set.freq) --------------------------------------
HF_CUTOFF = 0.5        # DCT band edge ρ for hf_noise and the patch's high-pass (ρ ∈ [0, √2))
HF_STRENGTH = 0.1      # std of the noise added to each high-band DCT coefficient (pixel units)
AMP_CUTOFF = 0.25      # FFT band edge in cycles per pixel (the corner of the spectrum is at √0.5)
AMP_MIX_MAX = 0.5      # the mixing weight λ is drawn uniformly from [0, AMP_MIX_MAX] per image
PATCH_SIZE = 4         # side of the square patch, in pixels
PATCH_STRENGTH = 0.6   # largest absolute value of the patch pattern (pixel units)


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): X = D x is the DCT of x and x = Dᵀ X its inverse."""
    k = torch.arange(n, dtype=dtype)[:, None]
    i = torch.arange(n, dtype=dtype)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D orthonormal DCT-II over the last two dimensions."""
    dh, dw = dct_matrix(x.shape[-2], x.dtype).to(x.device), dct_matrix(x.shape[-1], x.dtype).to(x.device)
    return dh @ x @ dw.T


def idct2(c: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct2`."""
    dh, dw = dct_matrix(c.shape[-2], c.dtype).to(c.device), dct_matrix(c.shape[-1], c.dtype).to(c.device)
    return dh.T @ c @ dw


def dct_high_band(h: int, w: int, cutoff: float, device=None) -> torch.Tensor:
    """bool (h, w): DCT coefficients (u, v) with sqrt((u/h)² + (v/w)²) >= cutoff."""
    u = torch.arange(h, dtype=torch.float64, device=device)[:, None] / h
    v = torch.arange(w, dtype=torch.float64, device=device)[None, :] / w
    return (u.square() + v.square()).sqrt() >= cutoff


def fft_high_band(h: int, w: int, cutoff: float, device=None) -> torch.Tensor:
    """bool (h, w) in torch.fft.fft2 layout: frequencies with radius >= cutoff (cycles per pixel)."""
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(w, device=device, dtype=torch.float64)[None, :]
    return (fy.square() + fx.square()).sqrt() >= cutoff


def hf_noise(x: torch.Tensor, generator: torch.Generator, cutoff: float = HF_CUTOFF,
             strength: float = HF_STRENGTH) -> torch.Tensor:
    """Add N(0, strength²) to every high-band DCT coefficient (per image and channel); no clamp."""
    coeffs = dct2(x.to(torch.float64))
    band = dct_high_band(x.shape[-2], x.shape[-1], cutoff, x.device)
    noise = torch.randn(coeffs.shape, generator=generator, dtype=torch.float64).to(x.device) * strength
    return idct2(coeffs + noise * band).to(x.dtype)


def amp_mix(x: torch.Tensor, generator: torch.Generator, cutoff: float = AMP_CUTOFF,
            mix_max: float = AMP_MIX_MAX, partner: torch.Tensor | None = None) -> torch.Tensor:
    """|F(x)| <- (1-λ)|F(x)| + λ|F(x_p)| in the high band, the phase of x kept; λ ~ U[0, mix_max] per
    image; the partner x_p is a random other image of the batch unless given. No clamp."""
    n = x.shape[0]
    if partner is None:
        # a cyclic shift by 1..n-1 never pairs an image with itself (a batch of one mixes with itself)
        shift = int(torch.randint(1, n, (1,), generator=generator)) if n > 1 else 0
        partner = x[(torch.arange(n) + shift) % n]
    spec = torch.fft.fft2(x.to(torch.float64))
    amp, phase = spec.abs(), torch.angle(spec)
    amp_p = torch.fft.fft2(partner.to(torch.float64)).abs()
    lam = torch.rand(n, generator=generator, dtype=torch.float64).to(x.device) * mix_max
    lam = lam.view(n, *([1] * (x.dim() - 1)))
    band = fft_high_band(x.shape[-2], x.shape[-1], cutoff, x.device)
    mixed = torch.where(band, (1 - lam) * amp + lam * amp_p, amp)
    return torch.fft.ifft2(torch.polar(mixed, phase)).real.to(x.dtype)


def high_pass_pattern(size: int, generator: torch.Generator, cutoff: float = HF_CUTOFF,
                      strength: float = PATCH_STRENGTH) -> torch.Tensor:
    """(size, size) random pattern with its DCT low band (ρ < cutoff) removed, max |value| = strength."""
    coeffs = dct2(torch.randn(size, size, generator=generator, dtype=torch.float64))
    pattern = idct2(coeffs * dct_high_band(size, size, cutoff))
    return pattern * (strength / pattern.abs().max().clamp_min(1e-12))


def paste_patch(x: torch.Tensor, pattern: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Add `pattern` (s, s) to every channel of image i at top-left (rows[i], cols[i]); no clamp."""
    out = x.clone()
    s = pattern.shape[-1]
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        out[i, :, r:r + s, c:c + s] += pattern.to(x.dtype)
    return out


def patch(x: torch.Tensor, generator: torch.Generator, size: int = PATCH_SIZE, cutoff: float = HF_CUTOFF,
          strength: float = PATCH_STRENGTH) -> torch.Tensor:
    """A high-pass patch (one pattern per call, as a trigger is shared) at a random position per image."""
    n, _, h, w = x.shape
    size = min(size, h, w)
    pattern = high_pass_pattern(size, generator, cutoff, strength)
    rows = torch.randint(0, h - size + 1, (n,), generator=generator)
    cols = torch.randint(0, w - size + 1, (n,), generator=generator)
    return paste_patch(x, pattern, rows, cols)


def frequency_augment(x: torch.Tensor, mode: str, generator: torch.Generator, **params) -> torch.Tensor:
    """Apply one named augmentation and clamp to the pixel range [0, 1]."""
    functions = {"hf_noise": hf_noise, "amp_mix": amp_mix, "patch": patch}
    if mode not in functions:
        raise ValueError(f"unknown frequency augmentation {mode!r}; allowed: {', '.join(FREQUENCY_AUGMENTATIONS)}")
    return functions[mode](x, generator, **params).clamp_(0.0, 1.0)
