"""Tests for sparse_dreambooth.data and the `sparse-db data` commands.

Real photos come from the committed fixture (three subjects, downscaled); the checks that need
the whole dataset run where it is found ($SPARSE_DB_DATA) and skip, saying so, elsewhere. The
download tests serve a small fake dataset from a local HTTP server.
"""

import functools
import hashlib
import http.server
import io
import os
import pathlib
import random
import socket
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DATA, FIXTURE_SUBJECTS, run_subprocess
from PIL import Image, ImageOps
from typer.testing import CliRunner

from sparse_dreambooth import data
from sparse_dreambooth.cli import app
from sparse_dreambooth.errors import UserError

# ---------------------------------------------------------------------------------------------
# The dataset's prompts, classes and subjects (the fixture's prompts_and_classes.txt is the dataset's)


def test_prompts_and_classes_parse_to_the_protocol():
    classes, object_templates, live_templates = data.read_prompts_and_classes(FIXTURE_DATA)
    assert len(classes) == 30
    assert classes["dog6"] == "dog"
    assert classes["bear_plushie"] == "stuffed animal"
    assert sum(class_name in data.LIVE_CLASSES for class_name in classes.values()) == 9
    assert len(object_templates) == 25 and len(live_templates) == 25
    assert object_templates[0] == "a {token} {class_name} in the jungle"
    assert live_templates[-1] == "a cube shaped {token} {class_name}"


def test_shipped_templates_equal_the_dataset_file():
    _, object_templates, live_templates = data.read_prompts_and_classes(FIXTURE_DATA)
    assert list(data.OBJECT_PROMPT_TEMPLATES) == object_templates
    assert list(data.LIVE_PROMPT_TEMPLATES) == live_templates


def test_list_subjects_reads_classes_kinds_and_images():
    # The fixture is a partial copy: its prompts_and_classes.txt names all 30, its folders three.
    subjects = data.list_subjects(FIXTURE_DATA)
    names = [subject.name for subject in subjects]
    assert names == sorted(names) and names == list(FIXTURE_SUBJECTS)
    dog6 = data.get_subject(FIXTURE_DATA, "dog6")
    assert (dog6.class_name, dog6.kind) == ("dog", "live")
    assert [path.name for path in dog6.image_paths] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]
    assert data.get_subject(FIXTURE_DATA, "backpack").kind == "object"
    assert all(4 <= len(subject.image_paths) <= 6 for subject in subjects)  # the paper's 4-6 per subject


def test_the_whole_dataset_has_30_subjects_of_4_to_6_photos(whole_dataset):
    subjects = data.list_subjects(whole_dataset)
    names = [subject.name for subject in subjects]
    assert names == sorted(names) and len(names) == 30
    assert all(4 <= len(subject.image_paths) <= 6 for subject in subjects)  # the paper's 4-6 per subject
    result = CliRunner().invoke(app, ["data", "list", "--data-root", str(whole_dataset)])
    assert result.exit_code == 0, result.output
    from sparse_dreambooth.micro.subjects import MICRO_SUBJECTS

    # header, the micro subjects, the demo alias, the dataset
    assert len(result.output.splitlines()) == 1 + len(MICRO_SUBJECTS) + 1 + 30


def test_a_subject_missing_from_a_partial_copy_says_how_to_get_all(tmp_path):
    with pytest.raises(UserError, match="partial copy") as caught:
        data.get_subject(FIXTURE_DATA, "cat2")
    assert "sparse-db data download" in str(caught.value) and "dog6" in str(caught.value)
    (tmp_path / data.PROMPTS_FILE).write_bytes((FIXTURE_DATA / data.PROMPTS_FILE).read_bytes())
    with pytest.raises(UserError, match="none of its subject folders"):
        data.list_subjects(tmp_path)


def test_prompts_for_live_and_object_subjects():
    dog6 = data.get_subject(FIXTURE_DATA, "dog6")
    backpack = data.get_subject(FIXTURE_DATA, "backpack")
    assert data.instance_prompt(dog6) == "a zjw dog"
    live_prompts = data.evaluation_prompts(dog6)
    assert len(live_prompts) == 25
    assert live_prompts[0] == "a zjw dog in the jungle"
    assert "a zjw dog wearing a santa hat" in live_prompts
    object_prompts = data.evaluation_prompts(backpack, token="sks", root=FIXTURE_DATA)
    assert "a sks backpack on top of a mirror" in object_prompts
    assert not any("santa hat" in prompt for prompt in object_prompts)


def test_unknown_subject_lists_the_known_ones():
    with pytest.raises(UserError, match="sparse-db data download") as caught:
        data.get_subject(FIXTURE_DATA, "dgo6")
    assert "dog6" in str(caught.value) and "demo" in str(caught.value)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="sparse-db data download") as caught:
        data.get_subject(tmp_path, "dog6")
    assert "--data-root" in str(caught.value)


def test_resolve_data_root_prefers_option_then_environment_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_DB_DATA", str(tmp_path / "from-env"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data.resolve_data_root(str(tmp_path / "from-cli")) == tmp_path / "from-cli"
    assert data.resolve_data_root(None) == tmp_path / "from-env"
    monkeypatch.delenv("SPARSE_DB_DATA")
    assert data.resolve_data_root(None) == tmp_path / "xdg" / "sparse-dreambooth" / "dreambooth"


def test_custom_subject(tmp_path):
    photos = tmp_path / "my_cat"
    photos.mkdir()
    for name in ("b.PNG", "a.jpg", "._a.jpg", "notes.txt"):
        (photos / name).write_bytes(b"")
    cat = data.custom_subject(photos, "cat")
    assert (cat.name, cat.kind) == ("my_cat", "live")
    assert [path.name for path in cat.image_paths] == ["a.jpg", "b.PNG"]
    assert data.custom_subject(photos, "mug").kind == "object"
    assert data.custom_subject(photos, "cat", kind="object").kind == "object"
    assert data.evaluation_prompts(cat)[10] == "a zjw cat wearing a red hat"
    with pytest.raises(UserError, match="kind"):
        data.custom_subject(photos, "cat", kind="animal")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        data.custom_subject(empty, "cat")


# ---------------------------------------------------------------------------------------------
# The micro subjects and the demo alias


def test_micro_subject_photos_are_cached_once_and_deterministic(monkeypatch, tmp_path):
    import numpy as np
    from PIL import Image

    from sparse_dreambooth.micro.subjects import PHOTO_COUNT, subject_photos

    generations = []
    for cache in ("first", "second"):
        monkeypatch.setenv("SPARSE_DB_CACHE", str(tmp_path / cache))
        folder = data.micro_subject_dir("teal_dog")
        assert folder == tmp_path / cache / "micro-subjects-v1" / "teal_dog"
        generations.append({path.name: path.read_bytes() for path in sorted(folder.iterdir())})
    assert generations[0] == generations[1]
    assert len(set(generations[0].values())) == PHOTO_COUNT  # different photos, not one picture five times
    # The cached PNGs are the rendered photos, pixel for pixel (the cache adds nothing and loses nothing).
    cached = [np.asarray(Image.open(path)) for path in sorted(folder.iterdir())]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(cached, subject_photos("teal_dog"), strict=True))
    assert not [path for path in folder.parent.iterdir() if path.name.startswith(".")]  # no staging left


def test_micro_subjects_resolve_through_find_subject(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_DB_CACHE", str(tmp_path))
    dog = data.find_subject("micro/teal_dog")
    assert (dog.name, dog.class_name, dog.kind) == ("micro/teal_dog", "dog", "live")
    assert data.evaluation_prompts(dog)[10] == "a zjw dog wearing a red hat"
    assert data.find_subject("micro/star_can").kind == "object"
    with pytest.raises(UserError, match="did you mean 'micro/teal_dog'"):
        data.find_subject("micro/teal_dgo")

    demo = data.get_subject(None, "demo")
    robot = data.get_subject(None, "micro/robot_toy")
    assert (demo.name, demo.class_name, demo.kind) == ("demo", "toy", "object")
    assert [path.read_bytes() for path in demo.image_paths] == [path.read_bytes() for path in robot.image_paths]
    assert data.instance_prompt(demo) == "a zjw toy"
    assert data.evaluation_prompts(demo)[0] == "a zjw toy in the jungle"
    assert data.prepare_image(demo.image_paths[0], 32).pixels.shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------
# prepare_image


def _save(image, path, **options):
    image.save(path, **options)
    return path


def _halves(size, first, second):
    """An RGB image, `size` = (width, height), whose left half is `first` and right half `second`."""
    width, height = size
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[:, : width // 2] = first
    canvas[:, width // 2 :] = second
    return Image.fromarray(canvas)


RED, BLUE = (255, 0, 0), (0, 0, 255)


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    # Stored as 40 wide x 20 tall, red left, blue right. EXIF orientation 6 means "rotate 90 degrees
    # clockwise to display": upright it is 20 wide x 40 tall with red on top and blue below.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(_halves((40, 20), RED, BLUE), tmp_path / "rotated.jpg", exif=exif, quality=95)

    prepared = data.prepare_image(path, 16)
    assert prepared.original_size == (40, 20)
    # Resized to 16 wide x int(16 * 40 / 20) = 32 tall; the centre crop starts at row (32 - 16) / 2 = 8,
    # so the red/blue edge (row 16 of 32) lands on row 8 of the crop.
    assert prepared.crop_top_left == (8, 0)
    top, bottom = prepared.pixels[:, 2, 8], prepared.pixels[:, 13, 8]
    assert top[0] > 0.8 and top[2] < -0.8  # red
    assert bottom[2] > 0.8 and bottom[0] < -0.8  # blue


def _expected(rgb):
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 127.5 - 1.0


@pytest.mark.parametrize(
    "make_image, expected_rgb",
    [
        pytest.param(lambda: Image.new("CMYK", (24, 20), (255, 0, 0, 0)), (0, 255, 255), id="CMYK-cyan"),
        pytest.param(lambda: Image.new("RGBA", (24, 20), (255, 0, 0, 0)), (255, 255, 255), id="RGBA-transparent"),
        pytest.param(lambda: Image.new("RGBA", (24, 20), (255, 0, 0, 255)), (255, 0, 0), id="RGBA-opaque"),
        pytest.param(lambda: Image.new("L", (24, 20), 200), (200, 200, 200), id="L"),
        # 16448 = 64 * 257, the 16-bit code of 8-bit level 64; Pillow alone would clip it to 255.
        pytest.param(lambda: Image.fromarray(np.full((20, 24), 16448, dtype=np.uint16)), (64, 64, 64), id="I;16"),
        pytest.param(lambda: Image.new("RGB", (24, 20), (0, 255, 0)).convert("P"), (0, 255, 0), id="P"),
    ],
)
def test_image_modes_convert_to_rgb(tmp_path, make_image, expected_rgb):
    image = make_image()
    path = _save(image, tmp_path / ("image.tiff" if image.mode == "CMYK" else "image.png"))
    with Image.open(path) as reopened:  # the mode must survive the file, or the test checks nothing
        assert reopened.mode == image.mode

    prepared = data.prepare_image(path, 16, center_crop=True)
    assert prepared.pixels.shape == (3, 16, 16) and prepared.pixels.dtype == torch.float32
    assert torch.allclose(prepared.pixels, _expected(expected_rgb).expand(3, 16, 16), atol=1.5 / 127.5)


def test_palette_transparency_goes_white(tmp_path):
    image = Image.new("P", (20, 20), 0)
    image.putpalette([255, 0, 0] * 256)
    path = _save(image, tmp_path / "transparent.png", transparency=0)
    prepared = data.prepare_image(path, 8)
    assert torch.allclose(prepared.pixels, torch.ones(3, 8, 8), atol=1e-6)


def test_real_photo_range_shape_and_sizes():
    path = FIXTURE_DATA / "dog6" / "00.jpg"
    prepared = data.prepare_image(path, 64)
    assert prepared.pixels.shape == (3, 64, 64) and prepared.pixels.dtype == torch.float32
    assert -1.0 <= prepared.pixels.min() < -0.5 and 0.5 < prepared.pixels.max() <= 1.0
    assert prepared.target_size == (64, 64)
    with Image.open(path) as image:
        assert max(prepared.original_size) == max(image.size) and min(prepared.original_size) == min(image.size)


def test_crop_and_flip_conditioning_by_hand(tmp_path):
    # 1030 wide x 600 tall at resolution 300: resized to int(300 * 1030 / 600) = 515 x 300.
    # Centre crop: left = round((515 - 300) / 2) = round(107.5) = 108 (Python rounds half to even).
    # Flipped, the crop's left edge in the mirrored image is 515 - 108 - 300 = 107.
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, size=(600, 1030, 3), dtype=np.uint8))
    path = _save(noise, tmp_path / "landscape.png")
    plain = data.prepare_image(path, 300)
    flipped = data.prepare_image(path, 300, flip=True)
    assert plain.original_size == (600, 1030)
    assert plain.crop_top_left == (0, 108)
    assert flipped.crop_top_left == (0, 107)
    assert torch.equal(flipped.pixels, torch.flip(plain.pixels, dims=[2]))

    portrait = _save(noise.transpose(Image.Transpose.TRANSPOSE), tmp_path / "portrait.png")
    assert data.prepare_image(portrait, 300).crop_top_left == (108, 0)

    # 1024 x 768 at 512: the long side is int(512 * 1024 / 768) = int(682.67) = 682, rounded down as
    # torchvision's Resize does, so left = round((682 - 512) / 2) = 85 (rounding up would give 86).
    four_by_three = _save(Image.new("RGB", (1024, 768)), tmp_path / "four_by_three.png")
    assert data.prepare_image(four_by_three, 512).crop_top_left == (0, 85)


def test_random_crop_is_seeded_and_in_range(tmp_path):
    path = _save(Image.new("RGB", (1030, 600), (10, 20, 30)), tmp_path / "landscape.png")
    offsets = [
        data.prepare_image(path, 300, center_crop=False, rng=random.Random(seed)).crop_top_left for seed in (0, 0, 1)
    ]
    assert offsets[0] == offsets[1] != offsets[2]
    assert all(top == 0 and 0 <= left <= 515 - 300 for top, left in offsets)
    with pytest.raises(ValueError, match="rng"):
        data.prepare_image(path, 300, center_crop=False)


def test_small_image_is_upscaled_with_a_warning(tmp_path):
    path = _save(Image.new("RGB", (20, 10), (0, 0, 0)), tmp_path / "small.png")
    with pytest.warns(UserWarning, match="upscaled"):
        prepared = data.prepare_image(path, 32)
    assert prepared.pixels.shape == (3, 32, 32)
    assert prepared.original_size == (10, 20)


def test_truncated_or_bogus_image_names_the_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UserError, match="truncated.jpg"):
        data.prepare_image(truncated, 32)
    bogus = tmp_path / "bogus.png"
    bogus.write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="bogus.png"):
        data.prepare_image(bogus, 32)


# ---------------------------------------------------------------------------------------------
# download_dataset, against a local HTTP server


FAKE_PROMPTS_FILE = """Classes

subject_name,class
rex,dog
mug,cup

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def _png_bytes(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def fake_dataset_files():
    """{path inside the dataset folder: bytes} of a two-subject dataset in the DreamBooth layout."""
    return {
        "prompts_and_classes.txt": FAKE_PROMPTS_FILE.encode(),
        "references_and_licenses.txt": b"photos by the test suite\n",
        "rex/00.png": _png_bytes((200, 150, 100)),
        "rex/01.png": _png_bytes((90, 60, 30)),
        "mug/00.png": _png_bytes((250, 250, 250)),
    }


def _manifest(files):
    return {path: hashlib.sha256(content).hexdigest() for path, content in files.items()}


def _write_zip(path, members):
    """Write a zip of {member name: bytes}."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def _github_layout(files):
    """The members of GitHub's archive of google/dreambooth: a top folder with dataset/ inside."""
    members = {f"dreambooth-main/dataset/{path}": content for path, content in files.items()}
    members["dreambooth-main/README.md"] = b"# DreamBooth\n"
    members["dreambooth-main/LICENSE.md"] = b"CC BY 4.0\n"
    return members


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files silently; /cut-short.zip promises 1000 bytes and hangs up after 10."""

    def do_GET(self):
        if self.path != "/cut-short.zip":
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"PK\x03\x04" + bytes(6))

    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """(folder, base URL): files put in the folder are served over HTTP on 127.0.0.1."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_unpacks_verifies_and_lists(served, tmp_path, fake_dataset_files):
    folder, base_url = served
    _write_zip(folder / "main.zip", _github_layout(fake_dataset_files))
    root = tmp_path / "data" / "dreambooth"
    manifest = _manifest(fake_dataset_files) | {"LICENSE.md": hashlib.sha256(b"CC BY 4.0\n").hexdigest()}

    assert data.download_dataset(root, url=f"{base_url}/main.zip", manifest=manifest, progress=False) == root
    assert sorted(path.name for path in root.iterdir()) == [
        "LICENSE.md",
        "mug",
        "prompts_and_classes.txt",
        "references_and_licenses.txt",
        "rex",
    ]
    assert os.listdir(root.parent) == ["dreambooth"]  # no temporary files left behind
    subjects = data.list_subjects(root)
    assert [(subject.name, subject.class_name, subject.kind, len(subject.image_paths)) for subject in subjects] == [
        ("mug", "cup", "object", 1),
        ("rex", "dog", "live", 2),
    ]
    rex_prompts = data.evaluation_prompts(subjects[1], root=root)  # the fake file's live list
    assert rex_prompts == ["a zjw dog in the jungle", "a zjw dog wearing a red hat"]

    # A second call finds the intact dataset and does not touch the network.
    assert data.download_dataset(root, url="http://127.0.0.1:9/gone.zip", manifest=manifest, progress=False) == root


@pytest.mark.parametrize("damage", ["wrong checksum", "missing file"])
def test_download_refuses_a_mismatch_and_leaves_nothing(served, tmp_path, fake_dataset_files, damage):
    folder, base_url = served
    _write_zip(folder / "main.zip", _github_layout(fake_dataset_files))
    manifest = _manifest(fake_dataset_files)
    if damage == "wrong checksum":
        manifest["rex/01.png"] = hashlib.sha256(b"something else").hexdigest()
        expected_name = "rex/01.png"
    else:
        manifest["rex/02.png"] = manifest["rex/01.png"]
        expected_name = "rex/02.png"
    root = tmp_path / "data" / "dreambooth"

    with pytest.raises(UserError, match=expected_name):
        data.download_dataset(root, url=f"{base_url}/main.zip", manifest=manifest, progress=False)
    assert not root.exists()
    assert os.listdir(root.parent) == []


@pytest.mark.parametrize("upstream_license", [None, ("LICENSE", b"Attribution 4.0 International\n")])
def test_download_only_warns_about_the_license_text(served, tmp_path, fake_dataset_files, upstream_license):
    # The packaged manifest's LICENSE.md comes from our copy; GitHub's archive may name or word
    # its license file differently. That must not refuse the data, which all checks out.
    folder, base_url = served
    members = _github_layout(fake_dataset_files)
    del members["dreambooth-main/LICENSE.md"]
    if upstream_license:
        name, text = upstream_license
        members[f"dreambooth-main/{name}"] = text
    _write_zip(folder / "main.zip", members)
    manifest = _manifest(fake_dataset_files) | {"LICENSE.md": hashlib.sha256(b"CC BY 4.0\n").hexdigest()}
    root = tmp_path / "data" / "dreambooth"

    with pytest.warns(UserWarning, match="LICENSE.md is missing; the dataset is CC BY 4.0"):
        assert data.download_dataset(root, url=f"{base_url}/main.zip", manifest=manifest, progress=False) == root
    assert [subject.name for subject in data.list_subjects(root)] == ["mug", "rex"]
    if upstream_license:
        assert (root / upstream_license[0]).read_bytes() == upstream_license[1]


def _symlink_member():
    member = zipfile.ZipInfo("dreambooth-main/dataset/rex/link.png")
    member.external_attr = 0o120777 << 16  # a symbolic link, its target stored as the content
    return member


@pytest.mark.parametrize(
    "unsafe_name",
    ["dreambooth-main/dataset/../../escaped.txt", "/tmp/sparse-db-absolute-escape.txt", "symlink"],
)
def test_download_refuses_members_that_escape(served, tmp_path, fake_dataset_files, unsafe_name):
    folder, base_url = served
    members = _github_layout(fake_dataset_files)
    with zipfile.ZipFile(folder / "main.zip", "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
        if unsafe_name == "symlink":
            archive.writestr(_symlink_member(), "/etc/passwd")
        else:
            archive.writestr(unsafe_name, b"escaped")
    with zipfile.ZipFile(folder / "main.zip") as archive:  # zipfile must not have cleaned the name up
        assert unsafe_name == "symlink" or unsafe_name in archive.namelist()
    root = tmp_path / "data" / "dreambooth"

    with pytest.raises(UserError, match="refusing the archive"):
        data.download_dataset(root, url=f"{base_url}/main.zip", manifest={}, progress=False)
    assert not root.exists()
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "data" / "escaped.txt").exists()
    assert not pathlib.Path("/tmp/sparse-db-absolute-escape.txt").exists()


def _closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_url_is_a_user_error(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/main.zip"
    with pytest.raises(UserError, match="--data-root") as caught:
        data.download_dataset(tmp_path / "dreambooth", url=url, manifest={}, progress=False)
    assert url in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_http_error_and_non_zip_are_user_errors(served, tmp_path):
    folder, base_url = served
    with pytest.raises(UserError, match="404"):
        data.download_dataset(tmp_path / "a", url=f"{base_url}/missing.zip", manifest={}, progress=False)
    (folder / "page.zip").write_text("<html>not a zip</html>")
    with pytest.raises(UserError, match="not a valid zip"):
        data.download_dataset(tmp_path / "b", url=f"{base_url}/page.zip", manifest={}, progress=False)
    with pytest.raises(UserError, match="after 10 of 1000 bytes"):
        data.download_dataset(tmp_path / "c", url=f"{base_url}/cut-short.zip", manifest={}, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["served"]


def test_download_will_not_overwrite_other_files(tmp_path):
    root = tmp_path / "occupied"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not a DreamBooth dataset"):
        data.download_dataset(root, url="http://127.0.0.1:9/main.zip", manifest={}, progress=False)
    assert (root / "thesis.tex").read_text() == "precious"


def test_packaged_manifest_matches_the_whole_dataset(whole_dataset):
    manifest = data._packaged_manifest()
    on_disk = [path.relative_to(whole_dataset).as_posix() for path in whole_dataset.rglob("*") if path.is_file()]
    assert sorted(manifest) == sorted(on_disk)
    assert manifest["dog6/00.jpg"] == hashlib.sha256((whole_dataset / "dog6" / "00.jpg").read_bytes()).hexdigest()


def test_the_fixture_is_small_credited_and_carries_the_dataset_s_prompts():
    size = sum(path.stat().st_size for path in FIXTURE_DATA.rglob("*") if path.is_file())
    assert size < 1_000_000, f"the committed fixture grew to {size} bytes"
    credits = (FIXTURE_DATA / "CREDITS.md").read_text()
    assert "CC BY 4.0" in credits and all(f"\n{name} (" in credits for name in FIXTURE_SUBJECTS)
    assert "Attribution 4.0 International" in (FIXTURE_DATA / "LICENSE.md").read_text()
    # The prompts file is the dataset's own, byte for byte, as the packaged manifest records it.
    prompts = (FIXTURE_DATA / data.PROMPTS_FILE).read_bytes()
    assert hashlib.sha256(prompts).hexdigest() == data._packaged_manifest()[data.PROMPTS_FILE]


def test_the_fixture_photos_are_the_dataset_s_downscaled(whole_dataset):
    for name in FIXTURE_SUBJECTS:
        fixture_photos = sorted(path.name for path in (FIXTURE_DATA / name).iterdir())
        assert fixture_photos == sorted(path.name for path in (whole_dataset / name).iterdir()), name
        for photo in fixture_photos:
            with Image.open(whole_dataset / name / photo) as original, Image.open(FIXTURE_DATA / name / photo) as small:
                assert max(small.size) == 128
                expected = np.asarray(ImageOps.exif_transpose(original).convert("RGB").resize(small.size), np.float64)
                difference = np.abs(np.asarray(small.convert("RGB"), np.float64) - expected).mean()
                assert difference < 8, (name, photo, difference)  # JPEG at quality 85 and the resampling filter


# ---------------------------------------------------------------------------------------------
# The `sparse-db data` commands


def test_data_list_shows_subjects_the_micro_ones_and_the_demo_alias():
    from sparse_dreambooth.micro.subjects import MICRO_SUBJECTS

    result = CliRunner().invoke(app, ["data", "list", "--data-root", str(FIXTURE_DATA)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()}
    assert rows["dog6"][1:4] == ["dog", "live", "5"]
    assert rows["backpack"][1:3] == ["backpack", "object"]
    assert rows["micro/teal_dog"][1:4] == ["dog", "live", "5"]
    assert rows["micro/star_can"][1:4] == ["can", "object", "5"]
    assert rows["demo"][1:4] == ["toy", "object", "5"] and "alias of micro/robot_toy" in " ".join(rows["demo"])
    # header, the micro subjects, demo, the dataset's subjects present
    assert len(rows) == 1 + len(MICRO_SUBJECTS) + 1 + len(FIXTURE_SUBJECTS)


def test_unknown_subject_is_one_line_and_exit_code_2(tmp_path):
    result = run_subprocess("data", "show", "no_such_subject", "--data-root", FIXTURE_DATA, cache=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("sparse-db: error: unknown subject 'no_such_subject'")


def test_data_commands_do_not_import_torch():
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from sparse_dreambooth.cli import app\n"
        "assert 'PIL' not in sys.modules, 'importing the CLI loaded PIL'\n"
        f"result = CliRunner().invoke(app, ['data', 'list', '--data-root', {str(FIXTURE_DATA)!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'torch' not in sys.modules, 'sparse-db data list loaded torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
