"""Hostile input, second round (issue 18): what a user, a model folder or an HTTP client sends is checked once,
answered with one line, and never executes, overwrites or escapes the output folder."""

import json
from html.parser import HTMLParser

import pytest

from llcm.evaluation.report import render_html, resolve

from cli_checks import one_error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")

XSS_CLASS = 'brain" onmouseover="alert(1)" x="'
PRE_CLASS = "</pre><script>alert(2)</script>"
XSS_LABEL = "<img src=x onerror=alert(3)>"
XSS_COMMAND = "llcm evaluate </pre><script>alert(4)</script>"


def hostile_results() -> dict:
    """The smallest results dict render_html reads, with hostile class names, model label and command."""
    classes = [XSS_CLASS, PRE_CLASS]
    metrics = {"fid": 12.5, "kid_mean": 0.01, "kid_std": 0.001, "precision": 0.5, "recall": 0.4,
               "density": 0.9, "coverage": 0.8}
    run = {"key": XSS_LABEL + "-4", "label": XSS_LABEL, "kind": "consistency", "k": 20, "steps": 4, "nfe": 4,
           "w": 6.0, "n_images": 2, "sampler": "consistency", "metrics": metrics, "seconds_per_image": 0.1,
           "per_class": {c: {"fid": 1.0, "kid_mean": 0.0, "recall": 1.0} for c in classes}, "grid": {},
           "model_hash": "abc", "images_dir": XSS_LABEL, "timesteps": [999, 759, 499, 259]}
    return {"runs": [run], "classes": [{"name": c} for c in classes], "created": XSS_LABEL,
            "extractor": {"name": XSS_LABEL, "dim": 8, "description": XSS_LABEL, "weights_sha1": None},
            "settings": {"per_class": 1, "test_split": XSS_LABEL, "data": XSS_LABEL, "seed_rule": XSS_LABEL},
            "real": {"per_class_n": {c: 1 for c in classes}}, "versions": {"llcm": XSS_LABEL},
            "command": XSS_COMMAND, "argv": [XSS_COMMAND]}


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data):
        self.text.append(data)


def test_report_escapes_hostile_class_names_labels_and_command(tmp_path):
    results = hostile_results()
    page = Elements()
    page.feed(render_html(results, tmp_path))
    assert "script" not in page.tags
    assert not [name for name, _ in page.attrs if name.startswith("on")]
    assert {name for name, _ in page.attrs} <= {"class", "data-key", "data-value", "alt", "src", "charset",
                                                "id"}
    for name, value in page.attrs:  # every data-key still points into the results
        if name == "data-key":
            resolve(results, value)
    text = "".join(page.text)
    for hostile in (XSS_CLASS, PRE_CLASS, XSS_LABEL, XSS_COMMAND):
        assert hostile in text
    embedded = [t for t in page.text if t.startswith("{")]
    assert json.loads(embedded[-1]) == results


# ------------------------------------------------------------------------------------------ the server's budget
@pytest.fixture(scope="module")
def tiny_pipe():
    from llcm.pipeline import load_pipeline

    return load_pipeline("tiny-cpu")


def test_server_refuses_a_request_beyond_its_pixel_step_budget(tiny_pipe, tmp_path):
    from llcm.errors import UserError
    from llcm.serve import Limits, Service

    service = Service(tiny_pipe, tmp_path / "out", Limits(max_steps=8, max_images=4, max_size=1024))
    size = tiny_pipe.default_size()
    assert service.info()["limits"]["pixel_steps"] == size * size * 8 * 4
    service.check("x", 8, 0, None, 4)  # the most steps and images at the model's own size fit
    with pytest.raises(UserError, match=r"4 images x 8 steps x 1024x1024 px = 33,554,432 pixel-steps, over this "
                                        rf"server's budget of {size * size * 32:,} per request .*fewer images"):
        service.generate("x", steps=8, seed=0, n=4, height=1024, width=1024)
    assert not any(service.out.iterdir()), "a refused request must leave nothing behind"


# ------------------------------------------------------------------------------------------ llcm generate's files
def generate(out, *extra) -> int:
    from llcm.cli import main

    return main(["generate", "x", "--model", "tiny-cpu", "--steps", "1", "--out", str(out), *extra])


def test_generate_refuses_to_overwrite_generation_json_and_grid(tmp_path, capsys):
    for name in ("generation.json", "grid.png"):
        out = tmp_path / name
        out.mkdir()
        (out / name).write_text("mine")
        assert generate(out) == 2
        assert f"{out / name} already exists" in one_error_line(capsys)
        assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "mine"


def test_generate_never_writes_through_a_link_out_of_its_folder(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept.png").write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    links = {"000_seed0.png": "kept.png", "grid.png": "new-grid.png", "generation.json": "new.json"}
    for name, target in links.items():
        (out / name).symlink_to(outside / target)  # one to an existing file, two dangling
    assert generate(out) == 2 and "already exists" in one_error_line(capsys)
    assert generate(out, "--overwrite") == 0
    assert sorted(p.name for p in outside.iterdir()) == ["kept.png"]
    assert (outside / "kept.png").read_text() == "precious"
    for name in links:  # the links were replaced by the files themselves
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert not list(out.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------ one line, not a traceback
@pytest.mark.parametrize("argv, bound", [
    (["--seed", str(2**64)], "--seed must be between 0 and 4294967295, got 18446744073709551616"),
    (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    (["--seed", str(2**32 - 1), "--batch", "2"], "--seed must be between 0 and 4294967294, got 4294967295"),
    (["--batch", "1000000000"],
     "--batch must be between 1 and 64 (1 prompt x --batch: at most 64 images), got 1000000000"),
    (["--height", "100000"], "--height must be between 1 and 4096, got 100000"),
    (["--height", "0"], "--height must be between 1 and 4096, got 0"),
    (["--width", "-8"], "--width must be between 1 and 4096, got -8"),
])
def test_generate_refuses_out_of_range_numbers_with_one_line(argv, bound, tmp_path, capsys):
    assert generate(tmp_path / "o", *argv) == 2
    assert one_error_line(capsys) == f"llcm generate: error: {bound}"
    assert not (tmp_path / "o").exists()


def test_pipeline_refuses_a_zero_height_instead_of_drawing_its_default(tiny_pipe):
    from llcm.errors import UserError

    with pytest.raises(UserError, match="height must be a positive multiple of the VAE factor 4, got 0"):
        tiny_pipe("x", steps=1, height=0)


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory):
    import shutil

    from llcm.pipeline import default_model_path

    dst = tmp_path_factory.mktemp("damaged") / "model"
    shutil.copytree(default_model_path(), dst)
    return dst


DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "zeroed": lambda b: bytes(len(b)),
    "empty": lambda b: b"",
    "not json": lambda b: b"{\"_class_name\": ",
}


@pytest.mark.parametrize("name, damage", [
    ("unet/diffusion_pytorch_model.safetensors", "truncated"),
    ("vae/diffusion_pytorch_model.safetensors", "zeroed"),
    ("text_encoder/model.safetensors", "empty"),
    ("unet/config.json", "not json"),
    ("vae/config.json", "zeroed"),
    ("text_encoder/config.json", "truncated"),
    ("scheduler/scheduler_config.json", "not json"),
    ("model_index.json", "truncated"),
    ("tokenizer/tokenizer_config.json", "empty"),
])
def test_a_damaged_model_file_is_named_in_one_line(model_copy, name, damage, tmp_path, capsys):
    path = model_copy / name
    good = path.read_bytes()
    path.write_bytes(DAMAGE[damage](good))
    try:
        assert generate(tmp_path / "o", "--model", str(model_copy)) == 2
        line = one_error_line(capsys)
    finally:
        path.write_bytes(good)
    assert line.startswith(f"llcm generate: error: {path} ") and not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, message", [
    ({"k": 0}, "k must be a whole number from 1 to 1000, got 0"),
    ({"k": None}, "k must be a whole number from 1 to 1000, got None"),
    ({"k": -20}, "k must be a whole number from 1 to 1000, got -20"),
    ({"k": 2.5}, "k must be a whole number from 1 to 1000, got 2.5"),
    ({"w_min": "five"}, "w_min must be a finite number, got 'five'"),
    ({"w_max": None}, "w_max must be a finite number, got None"),
    ({"w_min": 9.0, "w_max": 3.0}, "0 <= w_min <= w_max, got [9.0, 3.0]"),
    ({"latent_mean": [0.1, 0.2]}, "latent_mean has 2 values, the VAE"),
    ({"latent_mean": [0.1, float("nan"), 0.0, 0.0]}, "latent_mean must be a list of finite numbers"),
    ({"latent_mean": "zero"}, "latent_mean must be a list of finite numbers"),
])
def test_a_broken_llcm_json_value_is_refused_in_one_line(model_copy, change, message, tmp_path, capsys):
    path = model_copy / "llcm.json"
    good = path.read_text()
    path.write_text(json.dumps(json.loads(good) | change))
    try:
        assert generate(tmp_path / "o", "--model", str(model_copy)) == 2
        line = one_error_line(capsys)
    finally:
        path.write_text(good)
    assert line.startswith(f"llcm generate: error: {path}: ") and message in line, line


def test_evaluate_with_fewer_test_images_than_the_knn_k_is_one_line(tmp_path, capsys):
    from PIL import Image

    from llcm.cli import main
    from llcm.pipeline import default_model_path

    data = tmp_path / "data"
    rows = [{"file_name": f"{i}.png", "text": "brain", "class": "brain"} for i in range(3)]
    for split in ("train", "test"):
        (data / split).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(data / split / f"{i}.png")
        (data / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["evaluate", "--data", str(data), "--out", str(tmp_path / "out"), "--model",
               f"m={default_model_path()}", "--steps", "1", "--per-class", "8", "--extractor", "filterbank",
               "--quiet"])
    assert rc == 2
    line = one_error_line(capsys)
    assert "need more than k=3 images on each side" in line and "has 3 images" in line, line
    assert not list((tmp_path / "out").rglob("*.png"))
