import json

import pytest
import torch

from iclevr_ddpm import labels as L


def test_official_order():
    assert len(L.NAMES) == 24
    assert L.NAMES[0] == "gray cube" and L.NAMES[7] == "yellow cube"
    assert L.NAMES[8] == "gray sphere" and L.NAMES[16] == "gray cylinder"
    assert L.INDEX["cyan cylinder"] == 22 and L.name_of(1, 1) == "red sphere"


def test_official_files(official):
    assert L.load_objects(official / "objects.json") == L.INDEX
    train = L.load_train_labels(official / "train.json")
    assert len(train) == 18009
    test, new_test = (L.load_conditions(official / f) for f in ("test.json", "new_test.json"))
    assert (len(test), sum(map(len, test))) == (32, 72)
    assert (len(new_test), sum(map(len, new_test))) == (32, 84)


def test_multi_hot_round_trip():
    names = [["red sphere"], ["gray cube", "yellow cylinder", "cyan cube"]]
    v = L.multi_hot(names)
    assert v.shape == (2, 24) and v.dtype == torch.float32
    assert v.sum().item() == 4 and v[0, 9] == 1 and v[1, 23] == 1
    assert [sorted(L.decode(r)) for r in v] == [sorted(n) for n in names]


@pytest.mark.parametrize("entry, expected", [
    (["red cub"], "unknown object name 'red cub' (did you mean 'red cube'?)"),
    ([], "empty list"),
    (["red cube", "red cube"], "repeated object 'red cube'"),
    (["red cube", "blue cube", "green cube", "gray cube"], "4 objects"),
    ("red cube", "expected a list of object names, got str"),
])
def test_condition_errors_name_file_entry_value(tmp_path, entry, expected):
    path = tmp_path / "cond.json"
    path.write_text(json.dumps([["gray cube"], entry]))
    with pytest.raises(L.LabelFileError) as err:
        L.load_conditions(path)
    assert str(path) in str(err.value) and "entry 1" in str(err.value)
    assert expected in str(err.value)


def test_bad_json_and_wrong_types(tmp_path):
    bad = tmp_path / "test.json"
    bad.write_text('[["red cube"],')
    with pytest.raises(L.LabelFileError, match="invalid JSON"):
        L.load_conditions(bad)
    bad.write_text('{"a": 1}')
    with pytest.raises(L.LabelFileError, match="expected a JSON list"):
        L.load_conditions(bad)


def test_train_json_error_names_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"CLEVR_train_000000_0.png": ["red cube"],
                                "CLEVR_train_000000_1.png": ["red cube", "purpel sphere"]}))
    with pytest.raises(L.LabelFileError, match=r"entry 1 \(CLEVR_train_000000_1.png\): unknown object "
                                               r"name 'purpel sphere' \(did you mean 'purple sphere'\?\)"):
        L.load_train_labels(path)


def test_objects_json_must_match_official_order(tmp_path):
    path = tmp_path / "objects.json"
    swapped = dict(L.INDEX, **{"gray cube": 1, "red cube": 0})
    path.write_text(json.dumps(swapped))
    with pytest.raises(L.LabelFileError, match="'gray cube': index 1, expected 0"):
        L.load_objects(path)
