"""``samhq-fast segment`` end to end on a small generated checkpoint, and its error reporting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from samhq_fast.cli import main

from _weights import build_official, perturb_, save_official_pth, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    official = perturb_(build_official(small_config()), seed=0)
    save_official_pth(official, tmp / "x.pth")
    y, x = np.mgrid[0:120, 0:90]
    img = np.stack([x * 2, y * 2, 255 - x - y], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(tmp / "img.png")
    return tmp


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_segment_writes_mask_overlay_and_json(files, capsys):
    out, overlay = files / "mask.png", files / "overlay.png"
    code, stdout, err = _run(
        capsys, "segment", files / "img.png", "--point", "40,60", "--point", "10,10,0",
        "--box", "5,5,80,110", "--checkpoint", files / "x.pth", "--device", "cpu",
        "--out", out, "--overlay", overlay, "--json",
    )  # fmt: skip
    assert code == 0, err
    with Image.open(out) as m:
        assert m.mode == "L" and m.size == (90, 120)
        values = set(np.unique(np.asarray(m)).tolist())
    assert values <= {0, 255}
    with Image.open(overlay) as o:
        assert o.mode == "RGB" and o.size == (90, 120)
    report = json.loads(stdout)
    assert len(report["scores"]) == 1 and len(report["masks"]) == 1
    assert report["masks"][0]["area"] == int((np.asarray(Image.open(out)) == 255).sum())
    assert len(report["masks"][0]["bbox"]) == 4


def test_segment_several_boxes_multimask_hq_only(files, capsys):
    code, stdout, err = _run(
        capsys, "segment", files / "img.png", "--box", "5,5,40,40", "--box", "50,60,89,119",
        "--checkpoint", files / "x.pth", "--device", "cpu", "--multimask", "--hq-only",
        "--out", files / "m2.png", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert len(report["scores"]) == 2 and len(report["masks"]) == 2


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["segment", "{d}/missing.png", "--out", "{d}/m.png"], "image file not found"),
        (["segment", "{d}/img.png", "--point", "1;2", "--out", "{d}/m.png"], "bad point"),
        (["segment", "{d}/img.png", "--point", "1,2,5", "--out", "{d}/m.png"], "label"),
        (["segment", "{d}/img.png", "--box", "1,2,3", "--out", "{d}/m.png"], "bad box"),
        (
            ["segment", "{d}/img.png", "--checkpoint", "{d}/nope.pth", "--out", "{d}/m.png"],
            "checkpoint not found",
        ),
        (
            [
                "segment",
                "{d}/img.png",
                "--box",
                "30,5,10,20",
                "--checkpoint",
                "{d}/x.pth",
                "--device",
                "cpu",
                "--out",
                "{d}/m.png",
            ],
            "x1 <= x2",
        ),  # fmt: skip
        (["segment", "{d}/img.png"], "--out"),
    ],
)
def test_errors_are_one_line(files, capsys, argv, needle):
    code, stdout, err = _run(capsys, *[a.format(d=files) for a in argv])
    assert code in (1, 2)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("samhq-fast: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err and stdout == ""


def test_python_m_offline_without_weights(files, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "samhq_fast", "segment", str(files / "img.png"),
         "--model", "vit_b", "--device", "cpu", "--out", str(tmp_path / "m.png")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode in (1, 2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("samhq-fast: error: ") and "--checkpoint PATH" in lines[0]


def test_everything_writes_masks_overlay_and_rle(files, capsys):
    from samhq_fast.amg import rle_to_mask

    out_dir, overlay, rle = files / "every", files / "every.png", files / "every.json"
    code, _, err = _run(
        capsys, "everything", files / "img.png", "--checkpoint", files / "x.pth",
        "--device", "cpu", "--points-per-side", "4", "--pred-iou-thresh", "0",
        "--stability-score-thresh", "0", "--out-dir", out_dir, "--overlay", overlay,
        "--rle", rle,
    )  # fmt: skip
    assert code == 0, err
    pngs = sorted(out_dir.glob("mask_*.png"))
    assert pngs, "no mask written"
    records = json.loads(rle.read_text())
    assert len(records) == len(pngs)
    for png, rec in zip(pngs, records, strict=True):
        mask = np.asarray(Image.open(png)) == 255
        assert np.array_equal(rle_to_mask(rec["segmentation"]), mask)
        assert rec["area"] == int(mask.sum()) and len(rec["bbox"]) == 4
    with Image.open(overlay) as o:
        assert o.size == (90, 120)


def test_everything_on_a_folder_reports_progress(files, capsys):
    folder = files / "folder"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.open(files / "img.png").convert("RGB").save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    code, _, err = _run(
        capsys, "everything", folder, "--checkpoint", files / "x.pth", "--device", "cpu",
        "--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
        "--out-dir", files / "folder_out",
    )  # fmt: skip
    assert code == 0, err
    assert "[1/2] a.png" in err and "[2/2] b.jpg" in err
    assert (files / "folder_out" / "a").is_dir() and (files / "folder_out" / "b").is_dir()


def test_everything_errors_are_one_line(files, capsys):
    code, _, err = _run(capsys, "everything", files / "missing.png", "--out-dir", files / "o")
    assert code == 2 and err.count("\n") == 1 and "not found" in err
    empty = files / "empty_folder"
    empty.mkdir()
    code, _, err = _run(capsys, "everything", empty, "--out-dir", files / "o")
    assert code == 2 and "no images" in err


def test_segment_with_the_trained_model_finds_the_shape(tmp_path, capsys):
    """End to end where mask shape matters: the point's shape comes back as the mask."""
    from fixtures.shapes import interior_point, iou, make_scene

    pth = os.path.join(ROOT, "tests", "fixtures", "shapes_model", "sam_hq_shapes.pth")
    rng = np.random.default_rng(5)
    image, truth = make_scene(rng, size=256, n_shapes=3)
    Image.fromarray(image).save(tmp_path / "scene.png")
    x, y = interior_point(truth[1], rng)
    code, stdout, err = _run(
        capsys, "segment", tmp_path / "scene.png", "--point", f"{x},{y}",
        "--checkpoint", pth, "--device", "cpu", "--out", tmp_path / "m.png",
        "--overlay", tmp_path / "o.png", "--json",
    )  # fmt: skip
    assert code == 0, err
    mask = np.asarray(Image.open(tmp_path / "m.png")) == 255
    assert iou(mask, truth[1]) > 0.7
    assert json.loads(stdout)["masks"][0]["area"] == int(mask.sum())
