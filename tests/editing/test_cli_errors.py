"""The application's commands (demo, eval, edit, continual): every user error is one line on
stderr, ``error: ...`` naming the file or value, status 2, no traceback; ``edit -o`` never
overwrites its input."""

import os
import shutil

import pytest
import torch
from PIL import Image

from funcmem.cli import main
from helpers import user_error

from .tiny_run import make_tiny_run

pytestmark = pytest.mark.usefixtures("keep_threads")  # commands set torch's threads (--threads)

THREADS = ["--threads", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny run, a photo, a damaged photo, an empty folder, a file, a damaged and a partial run."""
    root = tmp_path_factory.mktemp("cli")
    run = make_tiny_run(root / "run")
    Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(root / "in.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "empty").mkdir()
    (root / "damaged_photos").mkdir()
    (root / "damaged_photos" / "a.png").write_bytes(b"not a png")
    (root / "afile").write_text("x")
    shutil.copytree(run, root / "run_damaged")
    (root / "run_damaged" / "editor" / "model.safetensors").write_bytes(b"junk")
    shutil.copytree(run, root / "run_partial")
    (root / "run_partial" / "functional_memory" / "projector.json").unlink()
    return root


@pytest.mark.parametrize("images, message", [
    ("nope", "error: not a folder: {root}/nope"),
    ("empty", "error: no images (.jpg, .jpeg, .png) in folder {root}/empty"),
    ("damaged_photos", "error: cannot read image {root}/damaged_photos/a.png"),
])
@pytest.mark.parametrize("command", ["demo", "continual"])
def test_training_on_a_bad_photo_folder(capsys, files, command, images, message):
    line = user_error(capsys, [*THREADS, command, "--quick", "--images", str(files / images),
                               "--out", str(files / "out"), "--cache-dir", str(files / "cache")])
    assert line.startswith(message.format(root=files))


def test_demo_and_continual_values(capsys, files):
    assert "argument --steps: expected a positive integer, got -5" in user_error(capsys, ["demo", "--steps", "-5"])
    assert "argument --distill-weight: expected a finite number >= 0, got nan" in user_error(
        capsys, ["continual", "--distill-weight", "nan"])
    assert "argument --forget: unknown edit 'nope'; edits: saturate, " in user_error(capsys, ["continual", "--forget", "nope"])
    assert "argument --forget: edit 'age' named twice" in user_error(capsys, ["continual", "--forget", "age,age"])
    assert user_error(capsys, [*THREADS, "continual", "--forget", "saturate", "--methods", "fm_naive", "--out",
                               str(files / "out_forget")]) == (
        "error: --forget removes edits from the fm_replay generator: keep fm_replay in the methods")
    for bad in ("label,nope", "label,label", ","):
        assert "argument --condition: expected distinct names from encoders, base-hidden, label" in user_error(
            capsys, ["demo", "--condition", bad])
    if not torch.cuda.is_available():
        assert user_error(capsys, [*THREADS, "demo", "--quick", "--device", "cuda"]) == (
            "error: --device cuda: this PyTorch sees no CUDA GPU; run on --device cpu")


@pytest.mark.parametrize("run, images, message", [
    ("nope", "empty", "error: {root}/nope is not a run directory (no config.json); run `funcmem demo` first"),
    ("empty", "empty", "error: {root}/empty is not a run directory (no config.json); run `funcmem demo` first"),
    ("run_partial", "empty", "error: {root}/run_partial has no functional_memory/projector.json: it was written by "
                             "an older funcmem or is incomplete; run `funcmem demo` again"),
    ("run_damaged", "empty", "error: cannot read {root}/run_damaged/editor/model.safetensors as safetensors"),
    ("run", "empty", "error: no images (.jpg, .jpeg, .png) in folder {root}/empty"),
    ("run", "nope", "error: not a folder: {root}/nope"),
    ("run", "damaged_photos", "error: cannot read image {root}/damaged_photos/a.png"),
])
def test_eval_errors(capsys, files, run, images, message):
    line = user_error(capsys, [*THREADS, "eval", "--run", str(files / run), "--images", str(files / images)])
    assert line.startswith(message.format(root=files))


@pytest.mark.parametrize("args, message", [
    (["--run", "{root}/run", "{root}/nope.png", "-o", "{root}/o.png"], "error: no image file at {root}/nope.png"),
    (["--run", "{root}/run", "{root}/corrupt.png", "-o", "{root}/o.png"],
     "error: cannot read image {root}/corrupt.png"),
    (["--run", "{root}/run", "{root}/empty", "-o", "{root}/o.png"], "error: no image file at {root}/empty"),
    (["--run", "{root}/run", "{root}/in.png", "-o", "{root}/in.png"],
     "error: -o {root}/in.png is the input image; write the edit to another file"),
    (["--run", "{root}/run", "{root}/in.png", "-o", "{root}/o.xyz"],
     "error: cannot write an image to {root}/o.xyz: unknown image type '.xyz'; name it .png, .jpg or .webp"),
    (["--run", "{root}/run", "{root}/in.png", "-o", "{root}/afile/o.png"],
     "error: -o {root}/afile/o.png: {root}/afile is a file, not a folder"),
    (["--run", "{root}/run", "{root}/in.png", "-o", "{root}/o.png", "--method", "nope"],
     "error: the run has no method 'nope'; it has ['base', "),
    (["--run", "{root}/nope", "{root}/in.png", "-o", "{root}/o.png"], "error: {root}/nope is not a run directory"),
])
def test_edit_errors(capsys, files, args, message):
    args = [a.format(root=files) for a in args]
    line = user_error(capsys, [*THREADS, "edit", *args[:3], "make it brighter", *args[3:]])
    assert line.startswith(message.format(root=files))
    assert not (files / "o.png").exists()


def test_edit_refuses_an_empty_instruction(capsys, files):
    line = user_error(capsys, [*THREADS, "edit", "--run", str(files / "run"), str(files / "in.png"), " \n",
                               "-o", str(files / "o.png")])
    assert line.startswith("error: the instruction is empty")


def test_edit_never_overwrites_its_input_by_another_name(capsys, files, tmp_path):
    src = tmp_path / "photo.png"
    shutil.copy(files / "in.png", src)
    before = src.read_bytes()
    os.symlink(src, tmp_path / "link.png")
    os.link(src, tmp_path / "hard.png")
    for name in ("link.png", "hard.png", "./photo.png"):
        out = str(tmp_path / name) if not name.startswith("./") else f"{tmp_path}/./photo.png"
        line = user_error(capsys, [*THREADS, "edit", "--run", str(files / "run"), str(src), "brighter", "-o", out])
        assert "is the input image" in line
    assert src.read_bytes() == before


def test_edit_writes_its_output_atomically(capsys, files, tmp_path):
    out = tmp_path / "edited.jpg"
    assert main([*THREADS, "edit", "--run", str(files / "run"), str(files / "in.png"), "brighter", "-o", str(out)]) == 0
    assert Image.open(out).format == "JPEG" and Image.open(out).size == (50, 40)
    assert [p.name for p in tmp_path.iterdir()] == ["edited.jpg"]  # no temporary file left
