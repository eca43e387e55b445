"""Named views: what an imitator's data loader does to audio before its CLAP sees it.

Each view maps CLAP's 48 kHz mono input [B, 480000] to the same shape, differentiably (or
straight-through where the real operation has no gradient). Used in two places:
- expectation over transformation (EOT) in PGD: δ is optimised through randomly drawn views;
- measurement: `delta_e_musicldm` is Δe through the deterministic MusicLDM view.

A new attacker pipeline is a new entry in VIEWS (and a config change), not new PGD code.

The purifying attacker's transforms (pipeline/core/eot.py: noise, eq, lowpass, highpass, reverb,
compress, limit, smooth, quantise, spectral_gate, speed, resample_any) are views of the same name;
`mix:<a>+<b>+...` draws one of them per item and step (one extra CLAP pass per step, whatever
their number), e.g. `attack.eot_views: [clean48k, "mix:noise+eq+reverb+compress+speed"]`.

Codec views (`mp3_128`, and any `<codec>_<kbps>` with codec mp3 | vorbis | opus | aac) run the
real ffmpeg encoder and decoder in the forward pass, one subprocess pair per batch item (items in
parallel threads), with a straight-through gradient (BPDA). They are slow (~0.1-0.3 s of CPU per
10 s window and call); see docs/architecture.md, "Lossy inputs and outputs".
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pipeline.core.eot import TRANSFORMS, mix_view
from pipeline.encoders.base import CLAP_RATE
from pipeline.io.audio import LOSSY_CODECS, codec_round_trip

MUSICLDM_RATE = 16_000  # MusicLDM trains on 16 kHz audio
MUSICLDM_MAX_SHIFT = int(0.24 * CLAP_RATE)  # 10.24 s training crop vs CLAP's 10 s crop

ViewFn = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
_resamplers: dict[tuple[int, int, str], torch.nn.Module] = {}


def _resample(x: torch.Tensor, old: int, new: int) -> torch.Tensor:
    import julius

    key = (old, new, str(x.device))
    if key not in _resamplers:
        _resamplers[key] = julius.ResampleFrac(old, new).to(x.device)
    return _resamplers[key](x)


def round_trip(x: torch.Tensor, rate: int) -> torch.Tensor:
    """48 kHz -> `rate` -> 48 kHz (windowed sinc, julius): drops everything above rate/2."""
    down = _resample(x, CLAP_RATE, rate)
    return _resample(down, rate, CLAP_RATE)[..., : x.shape[-1]]


def peak_normalise(x: torch.Tensor) -> torch.Tensor:
    """AudioLDM-lineage loaders: (x − mean) / max|x| · 0.5, per item."""
    centred = x - x.mean(dim=-1, keepdim=True)
    return centred / centred.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) * 0.5


def _shift(x: torch.Tensor, generator: torch.Generator | None, max_shift: int) -> torch.Tensor:
    """A random crop offset, emulated as a circular shift of up to `max_shift` samples per item
    (none without a generator: the deterministic view)."""
    if generator is None or max_shift <= 0:
        return x
    shifts = torch.randint(0, max_shift + 1, (x.shape[0],), generator=generator).tolist()
    return torch.stack([torch.roll(item, -s, dims=-1) for item, s in zip(x, shifts)])


def straight_through(x: torch.Tensor, processed: torch.Tensor) -> torch.Tensor:
    """Forward: `processed`; backward: identity (for operations without a useful gradient)."""
    return x + (processed - x).detach()


def clean48k(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return x


def musicldm(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """MusicLDM's loader, deterministic part: 16 kHz round trip (it trains at 16 kHz and resamples
    to 48 kHz for CLAP) and AudioLDM-style peak normalisation. Its random 10 s crop of a 10.24 s
    crop is the separate view `musicldm_crop` (a random shift of the reference moves Δe by
    0.1-0.3 on its own, which swamps δ's gradient when mixed into every step)."""
    return peak_normalise(round_trip(x, MUSICLDM_RATE))


def musicldm_crop(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`musicldm` plus a random crop offset of up to 0.24 s (none without a generator)."""
    return _shift(musicldm(x), generator, MUSICLDM_MAX_SHIFT)


def int16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """16-bit quantisation (straight-through)."""
    return straight_through(x, torch.round(x * 32768.0).clamp(-32768, 32767) / 32768.0)


def gain(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random gain in [-6, 0] dB per item (0 dB without a generator)."""
    if generator is None:
        return x
    db = -6.0 * torch.rand(x.shape[0], 1, generator=generator).to(x.device)
    return x * 10 ** (db / 20)


def crop(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random crop offset of up to 1 s."""
    return _shift(x, generator, CLAP_RATE)


def codec_view(codec: str, kbps: int) -> ViewFn:
    """A view that encodes each item with the real `codec` at `kbps` (ffmpeg, as a mono 48 kHz
    stream) and decodes it back: forward = codec(x), backward = identity (straight-through, BPDA).
    Deterministic (the generator is not used)."""
    if codec not in LOSSY_CODECS:
        raise KeyError(f"unknown codec {codec!r}; known: {sorted(LOSSY_CODECS)}")
    spec = LOSSY_CODECS[codec]
    if not spec.min_kbps <= kbps <= spec.max_kbps:
        raise KeyError(f"{codec} bitrate {kbps} kbps outside [{spec.min_kbps}, {spec.max_kbps}]")

    def round_trip(item: np.ndarray) -> np.ndarray:
        return codec_round_trip(item[:, None], CLAP_RATE, codec, kbps)[:, 0]

    def view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        items = x.detach().float().cpu().numpy()  # [B, samples]
        workers = min(len(items), os.cpu_count() or 1)
        if workers > 1:  # one ffmpeg pair per item; they run side by side
            with ThreadPoolExecutor(workers) as pool:
                coded = np.stack(list(pool.map(round_trip, items)))
        else:
            coded = np.stack([round_trip(item) for item in items])
        return straight_through(x, torch.from_numpy(coded).to(device=x.device, dtype=x.dtype))

    view.__name__ = f"{codec}_{kbps}"
    return view


CODEC_VIEW = re.compile(r"^(mp3|vorbis|opus|aac)_(\d+)$")

VIEWS: dict[str, ViewFn] = {
    "clean48k": clean48k,
    "musicldm": musicldm,
    "musicldm_crop": musicldm_crop,
    "resample16k": lambda x, g=None: round_trip(x, 16_000),
    "resample22k": lambda x, g=None: round_trip(x, 22_050),
    "int16": int16,
    "gain": gain,
    "crop": crop,
    "mp3_128": codec_view("mp3", 128),
    **TRANSFORMS,
}


def get_view(name: str) -> ViewFn:
    """The view called `name`: an entry of VIEWS, or a codec view `<codec>_<kbps>` (made on first use)."""
    if name not in VIEWS and name.startswith("mix:"):
        VIEWS[name] = mix_view(name[len("mix:") :].split("+"))
    if name not in VIEWS:
        match = CODEC_VIEW.match(name)
        if not match:
            raise KeyError(
                f"unknown view {name!r}; known: {sorted(VIEWS)}, <mp3|vorbis|opus|aac>_<kbps> and mix:<a>+<b>+..."
            )
        VIEWS[name] = codec_view(match[1], int(match[2]))
    return VIEWS[name]
