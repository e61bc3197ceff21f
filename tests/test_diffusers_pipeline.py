"""IclevrPipeline: save/load in one call, the three output types, scheduler swaps through
from_config, the sample stage's path is the pipeline's, and clear errors for bad folders."""
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from iclevr_ddpm.diffusion import sampler_scheduler
from iclevr_ddpm.errors import UserError
from iclevr_ddpm.labels import LabelFileError
from iclevr_ddpm.pipeline import IclevrPipeline, ModelFolderError
from iclevr_ddpm.sampling import SampleConfig, sample_split


@pytest.fixture(scope="module")
def pipe(toy_model):
    return IclevrPipeline.from_pretrained(toy_model[2])


def test_from_pretrained_round_trip(toy_model, pipe):
    model, train_sched, folder = toy_model
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["iclevr_ddpm.model", "ConditionalUNet"]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for (name, a), b in zip(model.state_dict().items(), pipe.unet.state_dict().values()):
        assert torch.equal(a, b), name
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert torch.equal(pipe.scheduler.betas, train_sched.betas)  # the training schedule, carried over
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_output_types_hold_the_same_8bit_images(pipe):
    conds = [["red cube"], ["blue cube", "gray sphere"]]
    run = lambda kind: pipe(conds, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                            image_size=32, output_type=kind).images
    pil, arr, pt = run("pil"), run("np"), run("pt")
    assert [im.size for im in pil] == [(32, 32)] * 2 and pil[0].mode == "RGB"
    assert arr.shape == (2, 32, 32, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), np.round(arr * 255).astype(np.uint8))
    assert pt.shape == (2, 3, 32, 32) and torch.allclose(pt.permute(0, 2, 3, 1), torch.from_numpy(arr))
    with pytest.raises(UserError, match=r"output_type: 'latent' unknown; expected one of \['pil', 'np', 'pt'\]"):
        pipe(conds, output_type="latent")


def test_issue_example_and_scheduler_swap(toy_model, pipe):
    """The README's call, then DDIM built from the saved config: it must carry the training
    schedule and prediction type, i.e. sample as the project's own DDIM (tested on data)."""
    images = pipe([["red cube", "blue sphere"], ["gray cylinder"]], num_inference_steps=5,
                  guidance_scale=3.0, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and isinstance(images[0], Image.Image)
    saved = pipe.scheduler
    draw = lambda: pipe([["red cube"], ["blue cube"]], num_inference_steps=15, guidance_scale=2.0,
                        generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt").images
    try:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        swapped = draw()
        pipe.scheduler = sampler_scheduler("ddim", toy_model[1])
        own = draw()
        pipe.scheduler = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
        wrong_schedule = draw()  # diffusers' default linear betas: the control
    finally:
        pipe.scheduler = saved
    assert (swapped - own).abs().max() <= 2 / 255  # thresholding at 1.0 == clipping; 8-bit rounding
    assert (wrong_schedule - own).abs().mean() > 0.02


def test_sample_stage_path_is_the_pipeline(toy_model, pipe, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps([["red cube"], ["blue cube"]]))
    cfg = SampleConfig(steps=6, frames=4, batch_size=2, seed=5, device="cpu")
    sample_split(toy_model[2], tmp_path / "c.json", tmp_path / "out", cfg)
    direct = pipe([["red cube"], ["blue cube"]], num_inference_steps=6, generator=[
        torch.Generator().manual_seed(5 + i) for i in range(2)], image_size=64).images
    for i, im in enumerate(direct):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{i}.png")), np.asarray(im))


def test_bad_input_names_the_problem(toy_model, pipe, tmp_path):
    with pytest.raises(ModelFolderError, match=r"nowhere: model folder not found; expected the folder"):
        IclevrPipeline.from_pretrained(tmp_path / "nowhere")  # no attempt to reach the Hub
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match=r"empty: not a saved pipeline \(no model_index.json\)"):
        IclevrPipeline.from_pretrained(tmp_path / "empty")
    shutil.copytree(toy_model[2], tmp_path / "broken")
    shutil.rmtree(tmp_path / "broken" / "unet")
    with pytest.raises(ModelFolderError, match="broken: not a loadable IclevrPipeline"):
        IclevrPipeline.from_pretrained(tmp_path / "broken")
    with pytest.raises(LabelFileError, match="conditions: entry 1: unknown object name 'red cub'"):
        pipe([["red cube"], ["red cub"]], num_inference_steps=2)
    with pytest.raises(UserError, match="generator: 1 generators for 2 conditions"):
        pipe([["red cube"], ["blue cube"]], num_inference_steps=2, generator=[torch.Generator()])
