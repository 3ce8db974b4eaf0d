"""End to end: encode a clip with PyAV, run the CLI on it, decode every output and compare it
with the same run made in-process; the offline demo; CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import autogaze_wgpu
import av  # the `video` extra; `make test` installs it
import numpy as np
import pytest
from autogaze_wgpu import cli
from autogaze_wgpu.testing import synthetic_video
from autogaze_wgpu.video import load_npz, render
from autogaze_wgpu.video.interframe import InterframeOutput
from autogaze_wgpu.video.io import VideoWriter, read_frames
from autogaze_wgpu.video.metrics import InterframeMetrics
from conftest import MODEL_DIR, assert_exact, load_model
from PIL import Image


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with VideoWriter(path, fps=10) as w:
        for f in synthetic_video(num_frames=5, height=180, width=250, seed=7):
            w.write(f)
    return path


def test_cli_run_matches_in_process(clip, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "--mode",
        "tiled_full",
        "--clip-len",
        "3",
        "--gazing-ratio",
        "0.3",
        "--task-loss-requirement",
        "0.7",
    ]
    rc = cli.main(
        [
            "run",
            str(clip),
            "--model",
            str(MODEL_DIR),
            *args,
            "--keyframe-interval",
            "3",
            "--png",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "5 frames 250x180, mode tiled_full" in printed

    # The same run in-process, on the same decoded frames.
    frames = np.stack(list(read_frames(clip)))
    assert frames.shape == (5, 180, 250, 3)
    res = load_model("reference")(
        frames, mode="tiled_full", clip_len=3, gazing_ratio=0.3, task_loss_requirement=0.7
    )
    assert res.layout.tiles_shape == (1, 2) and res.confidence_kind == "teacher_forced"

    npz = load_npz(out / "fixations.npz")
    mine = res.to_numpy()
    assert sorted(npz) == sorted(mine)
    for k, v in mine.items():
        if k == "fixations_confidence":
            np.testing.assert_allclose(npz[k], v, atol=1e-6)
        else:
            assert_exact(k, npz[k], v)
    j = json.loads((out / "fixations.json").read_text())
    want = json.loads(res.to_json())
    assert j["summary"] == want["summary"] and j["layout"] == want["layout"]
    assert j["fps"] == 10.0 and j["source"] == "autogaze:reference"
    for a, b in zip(j["frames"], want["frames"]):
        for fa, fb in zip(a["fixations"], b["fixations"]):
            assert fa["confidence"] == pytest.approx(fb["confidence"], abs=1e-6)
            fa.pop("confidence"), fb.pop("confidence")
        assert a == b

    # Renders: PNGs exactly, the H.264 videos within compression error; metrics recomputed.
    inter = InterframeOutput(180, 250, keyframe_interval=3)
    metrics = InterframeMetrics()
    kinds = ("overlay", "mask", "interframe")
    decoded = {k: _decode(out / f"{k}.mp4") for k in kinds}
    assert all(len(v) == 5 for v in decoded.values())
    rendered = {k: [] for k in kinds}
    for t, (frame, gaze) in enumerate(zip(frames, res)):
        step = inter.step(frame, gaze.pixel_mask())
        metrics.add(frame, step.output, step.update_ratio, step.keyframe)
        want_imgs = {
            "overlay": render.overlay(frame, gaze),
            "mask": render.mask_image(gaze),
            "interframe": step.output,
        }
        for k, img in want_imgs.items():
            png = np.asarray(Image.open(out / "frames" / k / f"frame_{t:06d}.png"))
            assert_exact(f"{k} png {t}", png, img)
            rendered[k].append(img)
    # H.264 in yuv420p halves the chroma resolution, which 1 px coloured outlines feel; each
    # decoded frame must still be close to its own render and closer to it than to any other.
    for k in kinds:
        for t, vid in enumerate(decoded[k]):
            assert vid.shape == rendered[k][t].shape
            err = [np.abs(vid.astype(int) - r).mean() for r in rendered[k]]
            assert err[t] < 12.0 and (k == "mask" or err[t] == min(err)), (k, t, err)
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_frames"] == 5 and m["keyframe_interval"] == 3
    assert m["token_ratio"]["per_frame"] == pytest.approx(res.token_ratio.tolist())
    mi = m["interframe"]
    assert mi["per_frame"]["update_ratio"] == pytest.approx(metrics.update_ratio)
    assert mi["per_frame"]["keyframe"] == [True, False, False, True, False]
    assert mi["per_frame"]["psnr_db"][0] == "inf" and mi["per_frame"]["psnr_db"][3] == "inf"
    assert mi["psnr_db_mean"] == pytest.approx(metrics.psnr_mean)


def test_cli_run_window_and_baseline(clip, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "run",
            str(clip),
            "--baseline",
            "patch_diff",
            "--start",
            "0.1",
            "--stride",
            "2",
            "--max-frames",
            "2",
            "--format",
            "webm",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    npz = load_npz(out / "fixations.npz")
    assert npz["source_index"].tolist() == [1, 3]
    assert len(_decode(out / "overlay.webm")) == 2
    assert json.loads((out / "fixations.json").read_text())["source"] == "patch_diff"


def test_demo_offline_uses_patch_diff(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_cached_weights", lambda: None)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--frames", "4", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no AutoGaze weights" in printed and "patch_diff" in printed
    gif = Image.open(out / "demo.gif")
    assert gif.n_frames == 4
    for k in ("overlay", "mask", "interframe", "panels"):
        assert len(_decode(out / f"{k}.mp4")) == 4
    npz = load_npz(out / "fixations.npz")
    assert npz["num_gazes"][0] == 196 and (npz["num_gazes"][1:] > 0).all()  # the cup moves


def test_demo_with_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        cli.main(
            [
                "demo",
                "--model",
                str(MODEL_DIR),
                "--frames",
                "2",
                "--no-confidence",
                "--format",
                "none",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "source: AutoGaze" in capsys.readouterr().out
    assert json.loads((out / "fixations.json").read_text())["source"] == "autogaze:reference"
    assert (out / "demo.gif").is_file() and not (out / "overlay.mp4").exists()


def test_python_m_demo_runs(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(autogaze_wgpu.__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    env["HF_HUB_OFFLINE"] = "1"
    p = subprocess.run(
        [sys.executable, "-m", "autogaze_wgpu", "demo", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "autogaze-demo" / "demo.gif").is_file()
    assert "frames/s" in p.stdout


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "missing.mp4"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    assert cli.main(["run", str(bad), "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli.main(["info"]) == 0
    assert "backends:" in capsys.readouterr().out
