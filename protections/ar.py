"""Autoregressive (AR) perturbations (Sandoval-Segura et al., NeurIPS 2022)."""

from __future__ import annotations

import functools
import math
from typing import ClassVar, NamedTuple

import torch

from bench.api import PROTECTIONS, ImageSet, Protection

# The 8 causal neighbours of a 3×3 window as (row, column) offsets back from the pixel being generated.
OFFSETS = torch.tensor([(dr, dc) for dr in range(3) for dc in range(3) if (dr, dc) != (0, 0)])
REFERENCE_DIM = 3 * 32 * 32  # the paper's budget is an L2 norm on 3×32×32 CIFAR images
# The official finder: autoregressive_param_finder.py main(), with ARProcessPerturb3Channel and response() of
# autoregressive.py, run as its README says (--total=10 --required_nm_response=10 --gen_norm_upper_bound=50).
FINDER_SIZE, FINDER_CROP = 36, 4  # ar_p.generate(eps=1.0, p=2, size=(36, 36), crop=4): 32×32 crops
NORM_BOUND = 50.0  # --gen_norm_upper_bound: L2 norm of each trial's unscaled 3×32×32 crop
TRIALS = 3  # --num_gen_trials
MAX_CANDIDATES = 1_000_000  # --num_samples
# --required_nm_response: 10 in params-classes-10-mr-10.pt (CIFAR-10, SVHN, STL-10), 3 in params-classes-100-mr-3.pt
# (CIFAR-100, ImageNet-100), as create_ar_poisons_3channel.py create_ar_processes picks them.
MIN_RESPONSE_TEN, MIN_RESPONSE_MORE = 10.0, 3.0
SEARCH_ROUND = 4096  # single-channel candidates per round: fixed, so the first k processes do not depend on K
OTHERS_CHUNK = 64  # candidates whose other trials are drawn at once
CHUNK = 1024  # images per batch: fixed, so the start noise does not depend on the device's memory


def ar_fill(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Overwrite ``x[..., r, c]`` (r, c ≥ 2) in place with Σₖ coef[..., k]·x[..., r − drₖ, c − dcₖ].

    The paper fills pixels in raster order; a pixel depends only on pixels up and to the left of it, so
    each anti-diagonal r + c = d depends on earlier ones only and is filled at once (2S steps, not S²),
    with exactly the raster order's values. Rows and columns 0–1 keep the start noise.
    """
    size = x.shape[-1]
    dr, dc = OFFSETS.to(x.device).unbind(1)
    for d in range(4, 2 * size - 1):
        r = torch.arange(max(2, d - size + 1), min(size, d - 1), device=x.device)
        c = d - r
        neighbours = x[..., r[:, None] - dr, c[:, None] - dc]  # (..., L, 8)
        x[..., r, c] = (neighbours * coef[..., None, :]).sum(-1)
    return x


def response(signal: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The official ``response(filter, signal)`` (autoregressive.py) of each process's filter, ``get_filter``
    (its 3×3 coefficients with −1 at the centre), to ``signal``: N×F for signals N×C×H×W and ``coef``
    F×C×8. A valid 3×3 convolution summed over channels, ReLU, summed over positions; zero on the
    process's own realisations."""
    weight = signal.new_zeros((*coef.shape[:2], 3, 3))
    weight[..., 2 - OFFSETS[:, 0], 2 - OFFSETS[:, 1]] = coef.to(signal.dtype)  # back (dr, dc): at (2 − dr, 2 − dc)
    weight[..., 2, 2] = -1
    return torch.nn.functional.conv2d(signal, weight).clamp_min(0).sum((-2, -1))


# The finder works in diagonal coordinates, D[..., d, r] = x[..., r, d − r]: an anti-diagonal is a row of D and its
# 8 neighbours are slices of the 4 rows before it, so a fill needs no gathers (``ar_fill`` computes the same values).
_DIAG = torch.arange(2 * FINDER_SIZE - 1)[:, None] - torch.arange(FINDER_SIZE)  # d − r: the column
TO_DIAG = torch.where((_DIAG >= 0) & (_DIAG < FINDER_SIZE), torch.arange(FINDER_SIZE) * FINDER_SIZE + _DIAG,
                      FINDER_SIZE ** 2)  # flat x index of D[d, r]; FINDER_SIZE² is a zero
_CROP = torch.arange(FINDER_CROP, FINDER_SIZE)
FROM_DIAG = (_CROP[:, None] + _CROP) * FINDER_SIZE + _CROP[:, None]  # flat D index of the crop's x[r, c]
BOUNDARY = torch.tensor([r * FINDER_SIZE + c for r in range(FINDER_SIZE) for c in range(FINDER_SIZE)
                         if r < 2 or c < 2])  # the start signal's only values the recursion keeps
STAGES = (8, 10, 12, 14, 16, 20, 24, 32, 44, 2 * FINDER_SIZE - 2)  # diagonals after which a fill may stop early


def start_signals(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Unit Gaussian start signals, shape×36×36, as ``generate``'s ``torch.randn``; only rows and columns
    0–1 are drawn (the recursion overwrites every other value), the rest are 0."""
    start = torch.zeros((*shape, FINDER_SIZE ** 2), dtype=torch.float64)
    start[..., BOUNDARY] = torch.randn((*shape, len(BOUNDARY)), generator=gen, dtype=torch.float64)
    return start.view(*shape, FINDER_SIZE, FINDER_SIZE)


def crops_within(start: torch.Tensor, coef: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Realisations of processes ``coef`` (G×…×8) from ``start`` (G×…×36×36), cropped to …×32×32: which
    rows have a finite crop whose L2 norm (over all but the first axis) is ≤ ``bound``, and those crops.
    Exact early exit: filled pixels never change, so a partial crop norm over the bound already fails."""
    size, crop = FINDER_SIZE, FINDER_CROP
    flat = torch.cat([start.flatten(-2), start.new_zeros((*start.shape[:-2], 1))], -1)
    x, c = flat[..., TO_DIAG], coef  # …×(2S − 1)×S
    alive, sumsq, first = torch.arange(len(start)), start.new_zeros(len(start)), 4
    shifts = [(dr + dc, dr) for dr, dc in OFFSETS.tolist()]
    for last in STAGES:
        for d in range(first, last + 1):
            lo, hi = max(2, d - size + 1), min(size - 1, d - 2) + 1  # rows r of x[r, d − r], r, d − r ≥ 2
            value = sum(c[..., k, None] * x[..., d - s, lo - dr:hi - dr] for k, (s, dr) in enumerate(shifts))
            x[..., d, lo:hi] = value
            inside = value[..., max(crop, d - size + 1) - lo:max(0, min(size - 1, d - crop) + 1 - lo)]
            sumsq = sumsq + inside.square().flatten(1).sum(1)
        keep = sumsq.isfinite() & (sumsq <= bound * bound)
        alive, x, c, sumsq, first = alive[keep], x[keep], c[keep], sumsq[keep], last + 1
    ok = torch.zeros(len(start), dtype=torch.bool)
    ok[alive] = True
    return ok, x.flatten(-2)[..., FROM_DIAG]


class Processes(NamedTuple):
    """What a search found: ``coefficients`` K×C×8; ``starts`` K×TRIALS×C×36×36, the start signals of the
    trials that admitted each process (the response test used the last); ``draws``, single-channel
    coefficient vectors drawn."""

    coefficients: torch.Tensor
    starts: torch.Tensor
    draws: int


def find_processes(count: int, channels: int, rule: str, min_response: float, gen: torch.Generator) -> Processes:
    """``count`` C-channel AR processes by the official finder's criteria (autoregressive_param_finder.py
    main()), each candidate accepted or dropped in the order drawn:

    1. coefficients: per channel 8 Gaussians normalised to sum to 1 (``ARProcessPerturb3Channel()``;
       ``rule="contractive"``: to Σ|b| = 0.99 instead);
    2. stability: ``TRIALS`` realisations from unit Gaussian C×36×36 start signals, cropped to C×32×32
       (``generate(size=(36, 36), crop=4)``), each finite with L2 norm (all channels, unscaled) ≤
       ``NORM_BOUND``·√(C/3), i.e. ≤ 50 on 3 channels;
    3. distinctness (not for the first): the last realisation, scaled to L2 = 1, has a ``response`` ≥
       ``min_response``·√(C/3) to each process already found (the finder's lowest non-matching response).

    Always at the finder's 36 → 32 size, whatever the images' (the official files serve CIFAR, SVHN,
    STL-10 and ImageNet-100 alike). The same criteria and the same distribution of what passes, in a
    cheaper order: the trials are independent, so the last one is realised first; channels are
    independent, so its channels are screened one by one (each one's norm is at most the joint one)
    and survivors grouped C at a time in order; the response test comes before the other trials are
    drawn. Float64 on the CPU, so that the processes never depend on the device.
    """
    scale, side = math.sqrt(channels / 3), FINDER_SIZE
    bound, min_response = NORM_BOUND * scale, min_response * scale
    found: list[torch.Tensor] = []
    starts: list[torch.Tensor] = []
    pool = (torch.empty((0, 8), dtype=torch.float64), torch.empty((0, side, side), dtype=torch.float64),
            torch.empty((0, side - FINDER_CROP, side - FINDER_CROP), dtype=torch.float64))
    draws = 0
    while len(found) < count:
        if draws >= MAX_CANDIDATES * channels:
            raise ValueError(f"ar: {draws // channels} candidate processes drawn (the official finder's limit) "
                             f"and only {len(found)} of {count} pass; lower min_response (the official used "
                             f"{MIN_RESPONSE_MORE:g} for 100 classes)")
        coef = torch.randn((SEARCH_ROUND, 8), generator=gen, dtype=torch.float64)
        coef = coef / (coef.sum(1, keepdim=True) if rule == "bounded" else coef.abs().sum(1, keepdim=True) / 0.99)
        start = start_signals((SEARCH_ROUND,), gen)
        draws += SEARCH_ROUND
        ok, crops = crops_within(start, coef, bound)  # the last trial, one channel at a time
        pool = tuple(torch.cat([p, new]) for p, new in zip(pool, (coef[ok], start[ok], crops)))
        take = len(pool[0]) // channels * channels
        g_coef, g_start, g_crop = (p[:take].unflatten(0, (-1, channels)) for p in pool)
        pool = tuple(p[take:] for p in pool)
        norms = g_crop.flatten(1).norm(dim=1)
        keep = norms <= bound  # all channels together
        g_coef, g_start, signal = g_coef[keep], g_start[keep], (g_crop / norms[:, None, None, None])[keep]
        known = len(found)  # the response test against the processes found so far, then the other trials
        if known and min_response > 0:
            hopeful = response(signal, torch.stack(found)).amin(1) >= min_response
            g_coef, g_start, signal = g_coef[hopeful], g_start[hopeful], signal[hopeful]
        for chunk in range(0, len(g_coef), OTHERS_CHUNK):  # in order, only as far as needed
            if len(found) == count:
                break
            part = slice(chunk, chunk + OTHERS_CHUNK)
            others = start_signals((len(g_coef[part]), TRIALS - 1, channels), gen)
            stable = crops_within(others.flatten(0, 1), g_coef[part].repeat_interleave(TRIALS - 1, 0), bound)[0]
            for i in torch.nonzero(stable.view(-1, TRIALS - 1).all(1)).flatten().tolist():
                if len(found) == count:
                    break
                j = chunk + i
                if len(found) > known and min_response > 0:  # processes found earlier in this round
                    if response(signal[j:j + 1], torch.stack(found[known:])).amin() < min_response:
                        continue
                found.append(g_coef[j])
                starts.append(torch.cat([others[i], g_start[j][None]]))
    return Processes(torch.stack(found), torch.stack(starts), draws)


@functools.lru_cache(maxsize=8)
def _search(seed: int, count: int, channels: int, rule: str,
            min_response: float) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``find_processes``'s coefficients and draws from a generator seeded with ``seed``, and the generator's
    state after the search (the slow part on a CPU: cached, so that a process searches once per setting)."""
    gen = torch.Generator().manual_seed(seed)
    found = find_processes(count, channels, rule, min_response, gen)
    return found.coefficients, found.draws, gen.get_state()


def publish(train: ImageSet, noise: torch.Tensor, **info) -> ImageSet:
    """``train + noise`` (pixel units, on any device) rounded and clamped to 8 bits, reporting the L2 norm
    of the change that was published (mean and max over images, [0, 1] units) in ``info``."""
    images = (train.images.to(noise.device).float() + noise).round().clamp(0, 255)
    l2 = (images - train.images.to(noise.device).float()).flatten(1).norm(dim=1) / 255
    return train.with_images(images.to(torch.uint8).cpu(), **info, l2_mean=round(l2.mean().item(), 6),
                             l2_max=round(l2.max().item(), 6))


@PROTECTIONS.register("ar")
class Autoregressive(Protection):
    """AR perturbations (Sandoval-Segura et al., NeurIPS 2022, §3, App. A.3; official code
    psandovalsegura/autoregressive-poisoning, also in APBench). One AR process per class, C channels
    each: a pixel is a linear combination of its 8 previously generated neighbours in a causal 3×3
    window. Each image gets its own realisation (sample-wise, as ``create_ar_poisons_3channel.py``): a
    Gaussian start signal of (size + ``crop``)² per channel, the recursion run over it, the first ``crop``
    rows and columns dropped (the start-up transient; the paper: 36×36 → 32×32), the result scaled to L2 =
    ``l2_norm`` (paper: 1.0 in [0, 1] units on 3×32×32) and added; then rounded and clamped to [0, 255].

    Coefficients are searched as the official finder ``autoregressive_param_finder.py`` does
    (``find_processes``), seeded, never loaded from the official file (whose CIFAR-100 class 9 is NaN /
    all-zero): per channel Gaussian, normalised to sum to 1; kept if 3 realisations (36 → 32 crop) are
    finite with unscaled L2 ≤ 50 (3 channels), and, after the first class, if a unit-L2 realisation
    responds ≥ ``min_response`` to every earlier class's filter (``autoregressive.py`` ``response``,
    ``get_filter``). ``min_response`` unset: the official 10 up to 10 classes, 3 beyond (its two
    coefficient files). ``coefficients="contractive"`` (not the paper's): Σ|bₖ| = 0.99 < 1, stable by
    construction, but such processes decay away from the start noise, so the perturbation sits on the
    top and left borders (on 3×32×32, 5 % of its energy outside the top/left 8-px bands, which leave 56 %
    of the area; 62 % for "bounded"), unlike the paper's, and poisons less (CIFAR-10, 500 per class, cnn,
    quick for 20 epochs, crop+flip: 0.59 clean → 0.10 bounded, 0.28 contractive); their responses are
    too weak for the official thresholds (10⁵–10⁶ candidates for 10 classes), so unset ``min_response``
    means none for them.

    Deviations: C channels, the finder's bound and threshold scaled by √(C/3) (50 and 10 at 3 channels;
    the official is RGB only; without it greyscale's weaker responses can exhaust the finder's 10⁶
    candidates); candidates are tested in a cheaper order with the same criteria (``find_processes``).
    Other image sizes keep the paper's per-pixel RMS, L2 budget ``l2_norm``·√(d / 3072), d = C·H·W (0.29
    on 1×16×16; 3 on STL-10's 96×96, as the official), with the processes found at the finder's size.
    """

    paper: ClassVar[str] = "Sandoval-Segura et al. 2022 (AR perturbations) §3, App. A.3"
    version: ClassVar[int] = 2
    l2_norm: float = 1.0
    crop: int = 4
    coefficients: str = "bounded"
    min_response: float | None = None

    def __post_init__(self) -> None:
        if self.l2_norm < 0 or self.crop < 2 or self.coefficients not in ("bounded", "contractive"):
            raise ValueError("ar needs l2_norm ≥ 0, crop ≥ 2 (rows 0–1 are start noise) and coefficients "
                             f"'bounded' or 'contractive', got {self.l2_norm}, {self.crop}, {self.coefficients!r}")
        if self.min_response is not None and not self.min_response >= 0:
            raise ValueError(f"ar needs min_response ≥ 0 (0: no distinctness test), got {self.min_response}; "
                             "omit it for the official 10 (up to 10 classes) or 3 (more)")

    def threshold(self, num_classes: int) -> float:
        """The finder's lowest allowed response to an earlier class's filter (3-channel scale)."""
        if self.min_response is not None:
            return float(self.min_response)
        if self.coefficients == "contractive":
            return 0.0
        return MIN_RESPONSE_TEN if num_classes <= 10 else MIN_RESPONSE_MORE

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        channels, size, side = train.channels, train.size, train.size + self.crop
        threshold = self.threshold(train.num_classes)
        coef, draws, state = _search(seed, train.num_classes, channels, self.coefficients, threshold)
        gen = torch.Generator()
        gen.set_state(state)
        coef = coef.float().to(device)
        budget = self.l2_norm * math.sqrt(channels * size * size / REFERENCE_DIM)
        noise = torch.empty(train.images.shape, device=device)
        for start in range(0, len(train), CHUNK):
            labels = train.labels[start:start + CHUNK].to(device)
            x = torch.randn((len(labels), channels, side, side), generator=gen).to(device)
            x = ar_fill(x, coef[labels])[..., self.crop:, self.crop:]
            norms = x.flatten(1).norm(dim=1)
            if not (norms.isfinite() & (norms > 0)).all():  # e.g. a process that grows on far larger images
                raise RuntimeError(f"ar: a {channels}×{size}×{size} perturbation is not finite or is zero (the "
                                   "processes are checked on the official finder's 32×32 crops)")
            noise[start:start + CHUNK] = x * (budget * 255 / norms)[:, None, None, None]
        return publish(train, noise, l2_budget=round(budget, 6), min_response=threshold, candidates_drawn=draws)
