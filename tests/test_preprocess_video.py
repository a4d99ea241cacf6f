"""Video preprocessing: 5 clips of 2 s (ConstantClipsPerVideoSampler), first and last frame of
each clip, short side 224 (bilinear), CLIP normalisation, 3 spatial crops:
[15, 3, 2, 224, 224]."""

from __future__ import annotations

import fixtures_media as fm
import numpy as np
import pytest
import torch

from cachebind.errors import InputError
from cachebind.preprocess import preprocess
from cachebind.preprocess.image import CLIP_MEAN, CLIP_STD
from cachebind.preprocess.video import (
    VideoClips,
    clip_frame_indices,
    load_video,
    short_side_scale,
    uniform_crop,
    video_tensor,
)


def test_frame_indices_of_a_3s_10fps_video():
    # D = 3: starts i * 1/5 s; clip i holds frames ceil(10 * 0.2 i) .. ceil(10 * (0.2 i + 2)) - 1
    assert clip_frame_indices(30, 10.0) == [[0, 19], [2, 21], [4, 23], [6, 25], [8, 27]]


def test_frame_indices_of_a_12s_video_and_of_short_videos():
    assert clip_frame_indices(120, 10.0) == [[0, 19], [20, 39], [40, 59], [60, 79], [80, 99]]
    assert clip_frame_indices(25, 25.0) == [[0, 24]] * 5  # 1 s: every clip is the whole video
    assert clip_frame_indices(1, 10.0) == [[0, 0]] * 5  # one frame, repeated


def test_a_clip_in_which_no_frame_starts_shows_the_frame_on_screen_at_its_start():
    # A slideshow rate (one frame per 100 s, 300 s): clips start at 0, 59.6, 119.2, 178.8 and
    # 238.4 s, and the second, fourth and fifth contain no frame start (found by the fuzzer,
    # with a header declaring a 1-frame video at a tiny rate: it raised ValueError, a 5xx).
    assert clip_frame_indices(3, 0.01) == [[0, 0], [0, 0], [1, 1], [1, 1], [2, 2]]
    assert clip_frame_indices(1, 0.0005) == [[0, 0]] * 5


@pytest.mark.parametrize(
    ("fmt", "bframes"), [("mp4", 0), ("mp4", 3), ("mp4v", 0), ("webm", 0), ("webm-vp9", 0)]
)
def test_decoded_frames_are_the_sampled_ones(fmt, bframes):
    raw = fm.video_bytes(fmt, duration_s=3.0, fps=10, size=(64, 48), bframes=bframes)
    clips = load_video(raw, fmt)
    assert clips.num_frames == 30 and clips.fps == pytest.approx(10.0)
    assert clips.frames.shape == (5, 2, 48, 64, 3) and clips.frames.dtype == np.uint8
    for clip_frames, idx in zip(clips.frames, clips.indices, strict=True):
        for frame, i in zip(clip_frames, idx, strict=True):
            level = fm.video_frame(i, 64, 48)[40, 40, 1]  # the flat grey of frame i
            assert abs(float(frame[24:, 16:, 1].mean()) - level) < 4


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
@pytest.mark.parametrize(("duration", "size"), [(3.0, (64, 48)), (11.0, (48, 64)), (0.5, (40, 40))])
def test_output_shape_for_any_length_and_orientation(fmt, duration, size):
    x = preprocess("video", fm.video_bytes(fmt, duration_s=duration, fps=8, size=size))
    assert x.shape == (15, 3, 2, 224, 224) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def test_short_side_scale_sizes_follow_pytorchvideo():
    assert short_side_scale(torch.zeros(3, 2, 48, 64)).shape[-2:] == (224, 298)
    assert short_side_scale(torch.zeros(3, 2, 64, 48)).shape[-2:] == (298, 224)
    assert short_side_scale(torch.zeros(3, 2, 1080, 1920)).shape[-2:] == (224, 398)


def test_spatial_crops_are_left_centre_right_or_top_centre_bottom():
    cols = torch.arange(298.0).expand(3, 2, 224, 298)
    starts = [uniform_crop(cols, 224, i)[0, 0, 0, 0].item() for i in range(3)]
    assert starts == [0, 37, 74]  # centre: ceil((298 - 224) / 2)
    rows = torch.arange(301.0)[:, None].expand(3, 2, 301, 224)
    starts = [uniform_crop(rows, 224, i)[0, 0, 0, 0].item() for i in range(3)]
    assert starts == [0, 39, 77]  # ceil(38.5) = 39


def test_clip_major_crop_minor_order_and_normalisation():
    # Clip k is a constant grey 20 * (k + 1): outputs 3k, 3k+1, 3k+2 must all carry it.
    frames = np.stack([np.full((2, 48, 64, 3), 20 * (k + 1), np.uint8) for k in range(5)])
    x = video_tensor(VideoClips(frames, [[0, 0]] * 5, 1, 10.0))
    mean = torch.tensor(CLIP_MEAN)[:, None, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None, None]
    for k in range(5):
        expected = ((20 * (k + 1) / 255.0 - mean) / std).expand(3, 2, 224, 224)
        for j in range(3):
            torch.testing.assert_close(x[3 * k + j], expected, atol=1e-5, rtol=0)


def test_first_and_last_frames_reach_the_time_axis():
    frames = np.zeros((5, 2, 48, 64, 3), np.uint8)
    frames[:, 1] = 255  # last frame of every clip white, first black
    x = video_tensor(VideoClips(frames, [[0, 1]] * 5, 2, 10.0))
    assert (x[:, :, 0] < 0).all() and (x[:, :, 1] > 0).all()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (fm.garbage(), "undecodable"),
        (fm.truncated(fm.video_bytes("mp4", 3.0), 0.5), "undecodable"),
        (fm.audio_bytes("wav", 16000, 1, 1.0), "unsupported_format"),
        (b"", "empty"),
    ],
    ids=["garbage", "truncated-mp4", "audio-only", "zero-bytes"],
)
def test_bad_video_is_refused(raw, reason):
    with pytest.raises(InputError) as err:
        preprocess("video", raw, source="upload-9.mp4")
    assert err.value.reason == reason and "upload-9.mp4" in str(err.value)


# ----------------------------------------------------------------------------- display matrix

TURNS = {
    # (rotation counter-clockwise, mirrored after it) -> the same picture stored turned
    (90, False): np.rot90,
    (-90, False): lambda f: np.rot90(f, -1),
    (180, False): lambda f: np.rot90(f, 2),
    (90, True): lambda f: np.fliplr(np.rot90(f)),
    (0, True): np.fliplr,
}


@pytest.mark.parametrize(("rotation", "hflip"), sorted(TURNS), ids=str)
def test_a_video_with_a_display_matrix_equals_the_physically_turned_video(rotation, hflip):
    # Lossless frames, so "equal" is exact: the tensors of the two files are the same.
    tagged = fm.video_bytes("mov-png", 1.0, size=(64, 48), rotation=rotation, hflip=hflip)
    turned = fm.video_bytes("mov-png", 1.0, size=(64, 48), turn=TURNS[rotation, hflip])
    x = preprocess("video", tagged)
    assert torch.equal(x, preprocess("video", turned))
    assert not torch.equal(x, preprocess("video", fm.video_bytes("mov-png", 1.0, size=(64, 48))))


def test_a_portrait_phone_video_is_sampled_upright_and_cropped_top_centre_bottom():
    # Stored landscape, shown portrait (PyAV reads frame.rotation = -90 back).
    clips = load_video(fm.video_bytes("mp4", 1.0, size=(64, 48), rotation=-90))
    assert clips.frames.shape[2:4] == (64, 48)  # height 64, width 48: portrait
    red_corner = clips.frames[0, 0, :4, -4:]  # the stored top-left is now the top-right
    assert red_corner[..., 0].min() > 200 and red_corner[..., 1].max() < 60


def test_the_setting_off_samples_the_stored_frames():
    from cachebind.config import InputLimits

    tagged = fm.video_bytes("mov-png", 1.0, size=(64, 48), rotation=90)
    plain = fm.video_bytes("mov-png", 1.0, size=(64, 48))
    off = InputLimits(honour_pixel_metadata=False)
    assert torch.equal(preprocess("video", tagged, limits=off), preprocess("video", plain))
