"""Where the clips of an audio or video input start and end (ImageBind's clip sampler).

ImageBind uses pytorchvideo's ``ConstantClipsPerVideoSampler(clip_duration, clips_per_video)``:
clip ``i`` spans ``[i * s, i * s + clip_duration)`` with ``s = max(D - clip_duration, 0) / n``,
computed in exact fractions (``Fraction`` of the float ``D - clip_duration``). An input shorter
than one clip gives ``n`` identical clips starting at 0 that run past its end; the caller then
takes what exists (audio: the whole waveform, padded later; video: every frame).
"""

from __future__ import annotations

from fractions import Fraction


def clip_timepoints(
    duration: float, clip_duration: float = 2.0, clips_per_video: int = 3
) -> list[tuple[Fraction, Fraction]]:
    """[(start, end)] in seconds, exactly as the reference's sampler loop yields them."""
    clip = Fraction(clip_duration)
    max_start = Fraction(max(duration - clip, 0))
    step = max_start / clips_per_video
    return [(step * i, step * i + clip) for i in range(clips_per_video)]
