import json

import pytest
import torch
from PIL import Image

from iclevr_ddpm import config
from iclevr_ddpm import evaluator as ev
from iclevr_ddpm.config import resolve_precision
from iclevr_ddpm.errors import UserError
from iclevr_ddpm.labels import INDEX, NUM_LABELS, multi_hot
from iclevr_ddpm.evaluator import (EvaluatorConfig, accuracy, accuracy_by_shape, augment, build_evaluator,
                                   load_evaluator, save_evaluator, score_folder, topk_hits, topk_label_hits,
                                   train_evaluator)


def test_topk_metric_hand_computed():
    labels = torch.zeros(3, 24)
    labels[0, [0, 1, 2]] = 1       # 3 labels
    labels[1, [5]] = 1             # 1 label
    labels[2, [7, 8]] = 1          # 2 labels
    probs = torch.full((3, 24), 0.01)
    probs[0, [0, 1, 20]] = torch.tensor([0.9, 0.8, 0.95])   # top-3 = {20, 0, 1}: 2 hits
    probs[1, [5, 6]] = torch.tensor([0.3, 0.4])             # top-1 = {6}: 0 hits
    probs[2, [7, 8]] = torch.tensor([0.6, 0.7])             # top-2 = {8, 7}: 2 hits
    assert topk_hits(probs, labels).tolist() == [2, 0, 2]
    assert accuracy(probs, labels) == pytest.approx(4 / 6)
    # averaging per-batch scores (batches [0] and [1, 2]) would give (2/3 + 2/3) / 2 = 0.667 too,
    # so use batches [0, 1] and [2]: (2/4 + 2/2) / 2 = 0.75 != 4/6
    batch_avg = (accuracy(probs[:2], labels[:2]) + accuracy(probs[2:], labels[2:])) / 2
    assert batch_avg == pytest.approx(0.75) and accuracy(probs, labels) != pytest.approx(batch_avg)


def test_official_checkpoint_format_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_evaluator().eval()
    save_evaluator(model, tmp_path / "checkpoint.pth")
    raw = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert set(raw) == {"model"}
    assert raw["model"]["fc.0.weight"].shape == (24, 512) and raw["model"]["fc.0.bias"].shape == (24,)
    back = load_evaluator(tmp_path / "checkpoint.pth")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out = back(x)
        assert torch.equal(model(x), out)
    assert out.min() >= 0 and out.max() <= 1


def test_rejects_a_file_that_is_not_an_evaluator(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=r"x.pth: expected an evaluator checkpoint \{'model': state_dict\}"):
        load_evaluator(tmp_path / "x.pth")


def test_score_folder_table_and_metrics(tmp_path):
    torch.manual_seed(0)
    save_evaluator(build_evaluator(), tmp_path / "ev.pth")
    conds = [["red cube"], ["blue sphere", "gray cylinder"], ["cyan cube", "red sphere", "yellow cube"]]
    (tmp_path / "c.json").write_text(json.dumps(conds))
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(tmp_path / "imgs" / f"{i}.png")
    metrics, table = score_folder(tmp_path / "ev.pth", tmp_path / "imgs", tmp_path / "c.json", "cpu")
    assert metrics["images"] == 3 and metrics["labels"] == 6
    assert set(metrics["by_shape"]) == {"cube", "sphere", "cylinder"}  # 3 cubes, 2 spheres, 1 cylinder wanted
    cubes = sum(o.endswith("cube") and o in p.split(", ")  # cubes wanted and found, from the table
                for w, p in zip(table["wanted"], table["predicted_topk"]) for o in w.split(", "))
    assert metrics["by_shape"]["cube"] == pytest.approx(cubes / 3, abs=1e-4)
    assert metrics["accuracy"] == pytest.approx(table["hits"].sum() / 6, abs=1e-4)
    assert list(table.columns) == ["index", "wanted", "predicted_topk", "hits", "k"]
    assert table["k"].tolist() == [1, 2, 3]
    assert [len(p.split(", ")) for p in table["predicted_topk"]] == [1, 2, 3]


def test_augment_moves_whole_pixels_without_blur():
    # a one-pixel checkerboard is destroyed by any fractional (bilinear) shift
    board = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2.0 - 1
    x = board.expand(16, 3, 64, 64).clone()
    out = augment(x, EvaluatorConfig(low_res_prob=0.0, max_shift=0.06), torch.Generator().manual_seed(0))
    inner = out[:, :, 4:-4, 4:-4]
    assert torch.allclose(inner.abs(), torch.ones_like(inner), atol=1e-4)
    # shifted, not all left in place: some images start on the other colour
    assert (inner[:, 0, 0, 0] > 0).any() and (inner[:, 0, 0, 0] < 0).any()
    # low_res_prob 1: every batch goes through the 32 -> 64 round trip, which blurs it
    blurred = augment(x, EvaluatorConfig(low_res_prob=1.0), torch.Generator().manual_seed(0))
    assert blurred[:, :, 4:-4, 4:-4].abs().max() < 0.5


def test_precision_choices():
    assert resolve_precision("no", "cpu", cpu_bf16=True) == "no"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == "no"  # bf16 on the CPU only for callers that time it
    with pytest.raises(ValueError, match="evaluator.mixed_precision 'fp8'"):
        EvaluatorConfig(mixed_precision="fp8")


def test_auto_precision_is_the_faster_one_measured(monkeypatch):
    clock = [0.0]  # a fake clock that each step advances by its precision's cost
    monkeypatch.setattr(config.time, "perf_counter", lambda: clock[0])
    for bf16_seconds, want in ((0.5, True), (2.0, False)):
        calls = []

        def step(bf16, s=bf16_seconds):
            calls.append(bf16)
            clock[0] += s if bf16 else 1.0
        assert config.faster_precision(step, steps=3) == (want, {"fp32": 1.0, "bf16": bf16_seconds})
        assert calls == [False] * 4 + [True] * 4  # one untimed step of each first
    monkeypatch.undo()
    # the real timing of the evaluator: on a copy (model unchanged)
    model = build_evaluator()
    x, y = torch.zeros(2, 3, 64, 64), torch.zeros(2, NUM_LABELS)
    before = [p.clone() for p in model.parameters()]
    _, timing = ev.measure_precision(model, x, y, steps=1)
    assert set(timing) == {"fp32", "bf16"} and all(t > 0 for t in timing.values())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_missing_sample_is_a_clear_error(tmp_path):
    save_evaluator(build_evaluator(), tmp_path / "ev.pth")
    (tmp_path / "c.json").write_text(json.dumps([["red cube"], ["blue cube"]]))
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "imgs" / "0.png")
    with pytest.raises(UserError, match=r"imgs: 1 PNG images, expected 2 named 0.png .. 1.png "
                                         r"\(one per condition of .*c.json\)"):
        score_folder(tmp_path / "ev.pth", tmp_path / "imgs", tmp_path / "c.json", "cpu")
    for i in (1, 2):  # one too many is as wrong as one too few
        Image.new("RGB", (64, 64)).save(tmp_path / "imgs" / f"{i}.png")
    with pytest.raises(UserError, match="imgs: 3 PNG images, expected 2"):
        score_folder(tmp_path / "ev.pth", tmp_path / "imgs", tmp_path / "c.json", "cpu")
    (tmp_path / "imgs" / "2.png").unlink()
    assert score_folder(tmp_path / "ev.pth", tmp_path / "imgs", tmp_path / "c.json", "cpu")[0]["images"] == 2


def test_bad_evaluator_files_are_user_errors(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty.pth: not a PyTorch checkpoint file \(EOFError"):
        load_evaluator(tmp_path / "empty.pth")
    with pytest.raises(UserError, match="nope.pth: file not found"):
        load_evaluator(tmp_path / "nope.pth")
    torch.save({"model": {"fc.weight": torch.zeros(3, 3)}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="other.pth: not a ResNet18 evaluator checkpoint"):
        load_evaluator(tmp_path / "other.pth")


def test_train_evaluator_learns_and_adopts_official_checkpoint(tiny_processed, tmp_path, monkeypatch):
    data = tiny_processed[0] / "iclevr.pt"
    cfg = EvaluatorConfig(epochs=2, batch_size=16, device="cpu")
    # a CPU with native bf16 on which fp32 measures faster (as on some machines here): fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(ev, "measure_precision", lambda *a: (False, {"fp32": 1.0, "bf16": 1.1}))
    res = train_evaluator(cfg, data, tmp_path / "ev.pth", tmp_path / "ck.pt", tmp_path / "live")
    assert res["epochs"] == 2 and 0 <= res["heldout_accuracy"] <= 1
    assert res["precision"] == "fp32"
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["bf16"] is False  # kept on resume
    # trained channels_last, saved as plain tensors that a stock resnet18 loads
    state = torch.load(tmp_path / "ev.pth", weights_only=True)["model"]
    assert all(v.is_contiguous() for v in state.values())
    build_evaluator().load_state_dict(state)
    rows = (tmp_path / "live" / "plots" / "metrics" / "heldout_accuracy.tsv").read_text().splitlines()
    assert len(rows) == 3
    adopted = train_evaluator(EvaluatorConfig(checkpoint=str(tmp_path / "ev.pth")), data,
                              tmp_path / "copy.pth", tmp_path / "ck2.pt", tmp_path / "live2")
    assert adopted["heldout_accuracy"] == pytest.approx(res["heldout_accuracy"])
    assert (tmp_path / "copy.pth").read_bytes() == (tmp_path / "ev.pth").read_bytes()


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_evaluator_resumes_after_kill_and_saves_the_ema_weights(tiny_processed, tmp_path, kill_after_first_save):
    import iclevr_ddpm.evaluator as E
    data = tiny_processed[0] / "iclevr.pt"
    cfg = EvaluatorConfig(epochs=2, batch_size=16, device="cpu", mixed_precision="no", ema_decay=0.99)

    def run(name):
        return train_evaluator(cfg, data, tmp_path / f"{name}.pth", tmp_path / f"{name}_ck.pt", tmp_path / name)
    run("full")
    revive = kill_after_first_save(E)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    assert torch.load(tmp_path / "resumed_ck.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "resumed.pth").exists()
    revive()
    run("resumed")
    full, resumed = _weights(tmp_path / "full.pth"), _weights(tmp_path / "resumed.pth")
    assert all(torch.allclose(full[k].float(), resumed[k].float(), atol=1e-6) for k in full)
    # the saved evaluator holds the averaged weights, not the last trained ones
    trained = _weights(tmp_path / "full_ck.pt")
    assert not torch.allclose(full["fc.0.weight"], trained["fc.0.weight"])
    assert torch.equal(full["bn1.running_mean"], trained["bn1.running_mean"])


def test_accuracy_by_shape_counts_each_wanted_object_under_its_shape():
    # image 0 wants a red cube and a blue sphere, its top 2 are red cube and gray cylinder;
    # image 1 wants a cyan cube, its top 1 is cyan cube
    wanted = multi_hot([["red cube", "blue sphere"], ["cyan cube"]])
    probs = torch.zeros(2, NUM_LABELS)
    probs[0, INDEX["red cube"]], probs[0, INDEX["gray cylinder"]] = 0.9, 0.8
    probs[1, INDEX["cyan cube"]] = 0.7
    assert topk_label_hits(probs, wanted).sum().item() == 2
    assert accuracy_by_shape(probs, wanted) == {"cube": 1.0, "sphere": 0.0}  # no cylinder wanted
