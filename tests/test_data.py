import json

import numpy as np
import pytest
import torch
from PIL import Image

from iclevr_ddpm import labels as L
from iclevr_ddpm.data import DataError, load_processed, object_mask, preprocess, resize, to_model_range, val_split


def test_preprocess_synthetic(tiny_raw, tiny_processed):
    out, stats = tiny_processed
    d = torch.load(out / "iclevr.pt", weights_only=True)
    assert d["images"].shape == (36, 3, 64, 64) and d["images"].dtype == torch.uint8
    assert d["labels"].shape == (36, 24)
    train = json.loads((tiny_raw / "train.json").read_text())
    for f, lab in zip(d["files"], d["labels"]):
        assert sorted(L.decode(lab)) == sorted(train[f])
    png = np.array(Image.open(tiny_raw / "images" / d["files"][5]))
    assert torch.equal(d["images"][5], torch.from_numpy(png).permute(2, 0, 1))
    # held out by scene: the 3 images of a scene share one side of the split
    by_scene = {}
    for f, h in zip(d["files"], d["heldout"].tolist()):
        by_scene.setdefault(f.rsplit("_", 1)[0], set()).add(h)
    assert all(len(v) == 1 for v in by_scene.values()) and stats["heldout_images"] == 9
    assert stats["objects_per_image"] == {"1": 12, "2": 12, "3": 12}
    assert sum(stats["count_per_label"].values()) == 72
    x, y = load_processed(out / "iclevr.pt", "heldout")
    assert len(x) == len(y) == 9
    assert L.load_conditions(out / "test.json") == L.load_conditions(tiny_raw / "test.json")


def test_val_split_is_heldout_scenes_only(tiny_processed):
    """val conditions are the labels of held-out images, whose scenes no model trains on."""
    out, stats = tiny_processed
    d = torch.load(out / "iclevr.pt", weights_only=True)
    conditions, files = val_split(d["files"], d["labels"], d["heldout"], size=5, seed=0)
    assert len(conditions) == len(files) == 5 and len(set(files)) == 5
    train_scenes = {f.rsplit("_", 1)[0] for f, h in zip(d["files"], d["heldout"].tolist()) if not h}
    assert not {f.rsplit("_", 1)[0] for f in files} & train_scenes
    by_file = dict(zip(d["files"], d["labels"]))
    assert all(c == L.decode(by_file[f]) and 1 <= len(c) <= 3 for c, f in zip(conditions, files))
    assert val_split(d["files"], d["labels"], d["heldout"], 5, 0) == (conditions, files)  # seeded
    assert val_split(d["files"], d["labels"], d["heldout"], 5, 1)[1] != files
    # preprocess wrote every held-out image's labels (9 < the default 256), in file order
    written = L.load_conditions(out / "val.json")
    assert written == [L.decode(lab) for lab, h in zip(d["labels"], d["heldout"].tolist()) if h]
    assert stats["val_conditions"] == 9


def test_preprocess_output_is_byte_identical_on_rerun(tiny_raw, tiny_processed, tmp_path):
    """Same input, same bytes: otherwise DVC sees a new hash and reruns every later stage."""
    out, _ = tiny_processed
    preprocess(tiny_raw, tmp_path / "again.pt", tmp_path, heldout_fraction=0.25, seed=0)
    assert (tmp_path / "again.pt").read_bytes() == (out / "iclevr.pt").read_bytes()


def _real_like(root, n=4):
    """A hand-made 'real' folder: RGBA 320x240 PNGs of a coloured block on grey."""
    (root / "images").mkdir(parents=True)
    train, colors = {}, [(173, 35, 35), (42, 75, 215), (29, 105, 20), (255, 238, 51)]
    for i in range(n):
        a = np.full((240, 320, 4), 128, np.uint8)
        a[..., 3] = 255
        a[80:160, 120:200, :3] = colors[i]
        name = f"CLEVR_train_{i:06d}_0.png"
        Image.fromarray(a, "RGBA").save(root / "images" / name)
        train[name] = [["red cube", "blue cube", "green cube", "yellow cube"][i]]
    (root / "train.json").write_text(json.dumps(train))
    (root / "objects.json").write_text(json.dumps(L.INDEX))
    for split in ("test", "new_test"):
        (root / f"{split}.json").write_text(json.dumps([["red cube", "blue sphere"]]))
    return colors


def test_preprocess_real_rgba_320x240(tmp_path):
    colors = _real_like(tmp_path / "real")
    preprocess(tmp_path / "real", tmp_path / "out.pt", tmp_path, heldout_fraction=0.0)
    x, y = load_processed(tmp_path / "out.pt")
    assert x.shape == (4, 3, 64, 64)
    for img, color in zip(x, colors):  # centre keeps the block colour, corner the grey floor
        assert img[:, 32, 32].tolist() == list(color)
        assert img[:, 2, 2].tolist() == [128, 128, 128]
    assert y.argmax(1).tolist() == [1, 2, 3, 7]


def test_course_archive_layout_with_iclevr_folder(tmp_path):
    colors = _real_like(tmp_path / "real")
    (tmp_path / "real" / "images").rename(tmp_path / "real" / "iclevr")
    preprocess(tmp_path / "real", tmp_path / "out.pt", tmp_path, heldout_fraction=0.0)
    x, _ = load_processed(tmp_path / "out.pt")
    assert [img[:, 32, 32].tolist() for img in x] == [list(c) for c in colors]


def test_no_images_folder_names_both_names(tmp_path):
    _real_like(tmp_path / "real")
    (tmp_path / "real" / "images").rename(tmp_path / "real" / "pictures")
    with pytest.raises(DataError, match=r"no images folder: expected .*real/images or .*real/iclevr"):
        preprocess(tmp_path / "real", tmp_path / "out.pt", tmp_path)
    assert not (tmp_path / "out.pt").exists()


def test_bad_images_listed_in_one_error(tmp_path):
    _real_like(tmp_path / "real")
    (tmp_path / "real" / "images" / "CLEVR_train_000001_0.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "real" / "images" / "CLEVR_train_000002_0.png").unlink()
    with pytest.raises(DataError) as err:
        preprocess(tmp_path / "real", tmp_path / "out.pt", tmp_path)
    msg = str(err.value)
    assert "2 of 4 images failed" in msg
    assert "CLEVR_train_000001_0.png: unreadable" in msg and "CLEVR_train_000002_0.png: missing" in msg
    assert not (tmp_path / "out.pt").exists()


def test_unknown_label_in_train_json(tmp_path):
    _real_like(tmp_path / "real")
    (tmp_path / "real" / "train.json").write_text(json.dumps({"CLEVR_train_000000_0.png": ["pink cube"]}))
    with pytest.raises(L.LabelFileError, match="train.json: entry 0 .*'pink cube'"):
        preprocess(tmp_path / "real", tmp_path / "out.pt", tmp_path)


def test_missing_folder_names_the_param(tmp_path):
    with pytest.raises(DataError, match="data.raw_dir"):
        preprocess(tmp_path / "nope", tmp_path / "out.pt", tmp_path)


def test_resize_round_trip_keeps_range():
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = resize(resize(x, 32), 64)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert torch.allclose(resize(torch.full((1, 3, 64, 64), 0.5), 32), torch.full((1, 3, 32, 32), 0.5))


def test_object_mask_is_the_threshold_on_a_15x15_box_mean():
    """The separable box mean gives the mask of the direct 15x15 mean, edges (replicate) included."""
    g = torch.Generator().manual_seed(0)
    img = torch.randint(90, 110, (4, 3, 64, 64), generator=g, dtype=torch.uint8)  # a noisy floor
    for i, (r, c) in enumerate([(0, 0), (30, 40), (58, 5), (20, 58)]):  # objects at corners and edges
        img[i, :, r:r + 6, c:c + 6] = torch.randint(0, 256, (3, 1, 1), generator=g, dtype=torch.uint8)
    x = to_model_range(img)
    padded = torch.nn.functional.pad(x, (7,) * 4, mode="replicate")
    direct = (x - torch.nn.functional.avg_pool2d(padded, 15, stride=1)).abs().amax(1, keepdim=True) > 0.1
    m = object_mask(x)
    assert m.shape == (4, 1, 64, 64) and m.dtype == x.dtype
    assert torch.equal(m.bool(), direct)
    assert 36 <= m.sum() / 4 < 400  # each object is marked (6x6), the floor's noise (+-0.16) mostly not
