"""`kdpipe predict`: image files of any size and mode through a .pt or an .onnx model, top-k
classes as text or JSON lines, and a file that is not an image reported while the rest are
still classified."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdpipe.cli import main
from kdpipe.data.images import resize_uint8
from kdpipe.onnx_export import export_onnx, onnx_metadata, set_metadata
from kdpipe.predict import load_classifier, read_image, top_k
from kdpipe.quantize import calibration_images, quantize_int8
from tests.conftest import make_prepared
from tests.export_fixtures import exported_toy_student, saved_model


def _square(quadrant: int, side: int) -> np.ndarray:
    """What the toy data's class ``quadrant`` looks like, at ``side``×``side``: a bright quadrant."""
    pixels = np.full((side, side), 30, dtype=np.uint8)
    r, q = divmod(quadrant, 2)
    half = side // 2
    pixels[r * half:(r + 1) * half, q * half:(q + 1) * half] = 200
    return pixels


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A greyscale 8×8 student trained on the toy squares: .pt, .onnx and .int8.onnx."""
    folder = tmp_path_factory.mktemp("predict")
    data, _, normalize, props = exported_toy_student(folder, n_test=32, seed=11)
    quantize_int8(folder / "student.onnx", folder / "student.int8.onnx",
                  calibration_images(data.train, normalize, 0), props)
    return {"pt": folder / "student.pt", "onnx": folder / "student.onnx", "int8": folder / "student.int8.onnx"}


@pytest.fixture
def images(tmp_path):
    """Class c1 (top-right square) as greyscale PNG, RGBA PNG, RGB JPEG and palette PNG of odd
    sizes, plus a text file and a truncated PNG."""
    files = {}
    grey = Image.fromarray(_square(1, 37)).resize((23, 37))
    files["grey.png"] = grey
    rgba = Image.fromarray(np.stack([_square(1, 50)] * 3 + [np.full((50, 50), 255, np.uint8)], -1), "RGBA")
    files["rgba.png"] = rgba
    files["colour.jpg"] = Image.fromarray(np.stack([_square(1, 61)] * 3, -1), "RGB").resize((61, 45))
    files["palette.png"] = Image.fromarray(_square(1, 16)).convert("P")
    paths = {}
    for name, image in files.items():
        paths[name] = tmp_path / name
        image.save(paths[name])
    paths["notes.txt"] = tmp_path / "notes.txt"
    paths["notes.txt"].write_text("not an image\n")
    paths["cut.png"] = tmp_path / "cut.png"
    paths["cut.png"].write_bytes(paths["grey.png"].read_bytes()[:40])
    return paths


def test_read_image_converts_any_mode_and_resizes_as_prepare_does(images):
    for name in ("grey.png", "rgba.png", "colour.jpg", "palette.png"):
        for channels in (1, 3):
            pixels = read_image(images[name], channels, 8)
            assert pixels.shape == (channels, 8, 8) and pixels.dtype == torch.uint8, (name, channels)
    # the very resize prepare applies to CIFAR-10 and digits (antialiased bilinear on uint8)
    grey = torch.from_numpy(np.array(Image.open(images["grey.png"]))).unsqueeze(0).unsqueeze(0)
    assert torch.equal(read_image(images["grey.png"], 1, 8), resize_uint8(grey, 8)[0])
    rgb = read_image(images["colour.jpg"], 3, 8)
    assert torch.equal(rgb[0], rgb[1])  # a grey picture stays grey in RGB


@pytest.mark.parametrize("kind", ["pt", "onnx", "int8"])
def test_predict_classifies_every_image_and_reports_the_one_that_is_not(kind, model_files, images, capsys):
    files = [images[n] for n in ("grey.png", "notes.txt", "rgba.png", "colour.jpg", "palette.png")]
    code = main(["predict", str(model_files[kind]), *map(str, files), "--top-k", "2"])
    out, err = capsys.readouterr()
    assert code == 1  # one file failed
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(f) for f in files if f.suffix != ".txt"]
    for line in lines:
        top, second = line.split(": ")[1].split(", ")
        assert top.startswith("c1 (") and second.endswith("%)")
    assert err.splitlines() == [f"error: {images['notes.txt']}: not an image that can be read "
                                f"(cannot identify image file '{images['notes.txt']}')."]


def test_json_lines_have_the_top_k_classes_highest_first(model_files, images, capsys):
    assert main(["predict", str(model_files["onnx"]), str(images["grey.png"]), str(images["rgba.png"]), "--json",
                 "--top-k", "3"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [str(images["grey.png"]), str(images["rgba.png"])]
    for r in records:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert r["predictions"][0]["class"] == "c1" and set(r["predictions"][0]) == {"class", "probability"}
    # more classes asked for than the model has: all of them, summing to 1
    main(["predict", str(model_files["pt"]), str(images["grey.png"]), "--json", "--top-k", "10"])
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(record["predictions"]) == 4
    assert sum(p["probability"] for p in record["predictions"]) == pytest.approx(1.0, abs=1e-5)


def test_the_three_files_of_a_model_agree(model_files, images):
    """.pt, .onnx and int8: the same preprocessing, so (nearly) the same probabilities."""
    x = {}
    for kind, path in model_files.items():
        classifier = load_classifier(path)
        assert classifier.class_names == ["c0", "c1", "c2", "c3"]
        assert (classifier.channels, classifier.image_size) == (1, 8)
        pixels = read_image(images["colour.jpg"], classifier.channels, classifier.image_size)
        x[kind] = np.asarray(classifier.logits(classifier.normalize(pixels.unsqueeze(0))))[0]
    np.testing.assert_allclose(x["onnx"], x["pt"], atol=1e-4)
    assert np.argmax(x["int8"]) == np.argmax(x["pt"])


def test_every_unreadable_file_is_one_line_on_stderr(model_files, images, tmp_path, capsys):
    missing = tmp_path / "missing.png"
    code = main(["predict", str(model_files["pt"]), str(images["cut.png"]), str(missing), str(tmp_path),
                 str(images["grey.png"])])
    out, err = capsys.readouterr()
    assert code == 1 and out.startswith(f"{images['grey.png']}: c1 (")
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert lines[0].startswith(f"error: {images['cut.png']}: not an image that can be read (")
    assert lines[1] == f"error: {missing}: no such file."
    assert lines[2] == f"error: {tmp_path}: is a folder, not an image file."


def test_a_model_it_cannot_use_is_one_sentence_and_exit_2(model_files, images, tmp_path, capsys):
    image = str(images["grey.png"])
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(model_files["onnx"].read_bytes())
    set_metadata(foreign, {})  # an ONNX file without kdpipe's metadata
    cases = [(str(tmp_path / "none.onnx"), "none.onnx not found; the export stage writes the ONNX models"),
             (str(foreign), "has no kdpipe metadata"),
             (image, "is neither a .pt nor an .onnx model file"),
             (str(images["notes.txt"]).replace(".txt", ".pt"), "not found")]
    for model, message in cases:
        assert main(["predict", model, image]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert main(["predict", str(model_files["pt"]), image, "--top-k", "0"]) == 2
    assert "--top-k 0: expected an integer >= 1." in capsys.readouterr().err


def test_an_rgb_model_reads_greyscale_and_rgba_files(tmp_path, images, capsys):
    meta = make_prepared(channels=3, size=16, classes=4).meta
    model, file_meta = saved_model(tmp_path / "rgb.pt", "student_cnn", meta)
    export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "rgb.onnx", onnx_metadata("baseline", file_meta))
    for path in (tmp_path / "rgb.pt", tmp_path / "rgb.onnx"):
        assert main(["predict", str(path), str(images["grey.png"]), str(images["rgba.png"]), "--json"]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [len(r["predictions"]) for r in records] == [3, 3]


def test_top_k_softmax():
    assert top_k(np.array([0.0, np.log(3.0)]), ["a", "b"], 5) == [("b", 0.75), ("a", 0.25)]
