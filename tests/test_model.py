import contextlib
import math

import pytest
import torch

from iclevr_ddpm.config import from_params
from iclevr_ddpm.data import load_processed, object_mask, resize, to_model_range
from iclevr_ddpm.diffusion import (SAMPLERS, SCHEDULES, diffusion_loss, noise_scheduler, predicted_x0, sample_timesteps,
                                  sampler_scheduler, snr)
from iclevr_ddpm.errors import UserError
from iclevr_ddpm.labels import INDEX, multi_hot
from iclevr_ddpm.model import CONDITIONING, ConditionalUNet, attribute_matrix, exact_attention, model_kwargs
from iclevr_ddpm.train import TrainConfig


def tiny(**kw):
    torch.manual_seed(0)
    return ConditionalUNet(**model_kwargs({"preset": "tiny", **kw}))


def test_save_load_round_trip(tmp_path):
    for cond in CONDITIONING:
        m = tiny(conditioning=cond).eval()
        m.save_pretrained(tmp_path / cond)
        assert (tmp_path / cond / "diffusion_pytorch_model.safetensors").exists()
        back = ConditionalUNet.from_pretrained(tmp_path / cond).eval()
        x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 10, 999]), torch.eye(24)[:3]
        assert torch.equal(m(x, t, y), back(x, t, y))
        assert back.config.conditioning == cond


def test_labels_reach_the_output_unless_conditioning_is_none():
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([500, 500])
    a, b = torch.eye(24)[[0, 0]], torch.eye(24)[[5, 5]]
    for cond in CONDITIONING:
        differs = cond != "none"
        m = tiny(conditioning=cond).eval()
        torch.nn.init.normal_(m.unet.conv_out.weight)  # diffusers zero-inits nothing here; keep outputs non-trivial
        with torch.no_grad():
            assert (not torch.allclose(m(x, t, a), m(x, t, b))) == differs


def test_conditioning_builds_the_named_network():
    adagn = tiny(conditioning="scale_shift")
    resnet = adagn.unet.down_blocks[0].resnets[0]
    assert resnet.time_embedding_norm == "scale_shift"
    assert resnet.time_emb_proj.out_features == 2 * resnet.conv1.out_channels  # a scale and a shift
    assert tiny(conditioning="concat").unet.conv_in.in_channels == 3 + 24
    assert tiny(conditioning="concat").label_proj is None
    with pytest.raises(ValueError, match="model.conditioning 'film' unknown"):
        tiny(conditioning="film")


def test_cross_attention_sees_only_the_present_objects_tokens():
    m = tiny(conditioning="cross_attention", label_features="attributes").eval()
    attn = m.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2  # the cross-attention
    assert attn.to_k.in_features == m.label_tokens.embedding_dim == 64
    assert m.label_tokens.num_embeddings == 25 and m.attribute_tokens.in_features == 11
    torch.nn.init.normal_(m.unet.conv_out.weight)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([500, 500])
    y = torch.zeros(2, 24)
    y[0, [INDEX["red cube"], INDEX["blue sphere"]]] = 1  # row 1 stays dropped: the null token alone
    with torch.no_grad():
        before = m(x, t, y)
        m.label_tokens.weight[INDEX["gray cylinder"]] += 1.0  # an absent object's token: masked out
        assert torch.equal(m(x, t, y), before)
        m.label_tokens.weight[INDEX["red cube"]] += 1.0  # a present object's token
        after = m(x, t, y)
    assert not torch.allclose(after[0], before[0], atol=1e-4) and torch.equal(after[1], before[1])
    m.label_tokens.weight.data[24] += 1.0  # the null token reaches the dropped condition
    with torch.no_grad():
        assert not torch.allclose(m(x, t, y)[1], before[1], atol=1e-4)


def test_attribute_features_share_colour_and_shape_directions(tmp_path):
    a = attribute_matrix()
    assert a.shape == (24, 11) and torch.equal(a.sum(1), torch.full((24,), 2.0))
    # cyan = colour 6, cube = shape 0; gray cylinder = colour 0, shape 2 (labels.py order)
    assert a[INDEX["cyan cube"]].nonzero().flatten().tolist() == [6, 8]
    assert a[INDEX["gray cylinder"]].nonzero().flatten().tolist() == [0, 10]
    m = tiny(conditioning="scale_shift", label_features="attributes").eval()
    assert m.label_proj.in_features == 24 + 8 + 3
    seen = []
    m.label_proj.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0]))
    y = multi_hot([["red cube", "cyan cube", "red sphere"]])
    with torch.no_grad():
        x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
        m(x, t, y)
        # the projection reads [labels, colour counts (red 2, cyan 1), shape counts (cube 2, sphere 1)]
        assert torch.equal(seen[0], torch.cat([y, torch.tensor([[0, 2, 0, 0, 0, 0, 1, 0, 2, 1, 0.]])], 1))
        m.save_pretrained(tmp_path)  # the matrix is rebuilt from the config, not stored
        assert torch.allclose(ConditionalUNet.from_pretrained(tmp_path).eval()(x, t, y), m(x, t, y), atol=1e-5)
    assert tiny(conditioning="concat", label_features="attributes").label_proj is None
    with pytest.raises(ValueError, match=r"model.label_features 'colours' unknown; expected one of \['objects'"):
        model_kwargs({"label_features": "colours"})


def test_patch_size_runs_the_unet_on_folded_patches(tmp_path):
    m = tiny(resolution=32, patch_size=2).eval()
    assert m.unet.config.sample_size == 16 and m.unet.conv_in.in_channels == 12
    assert m.unet.conv_out.out_channels == 12
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 999]), torch.eye(24)[:2]
    with torch.no_grad():
        assert m(x, t, y).shape == (2, 3, 32, 32)
    m.save_pretrained(tmp_path)
    back = ConditionalUNet.from_pretrained(tmp_path).eval()
    assert back.config.patch_size == 2 and torch.equal(m(x, t, y), back(x, t, y))
    seen = []

    class Identity(torch.nn.Module):  # records what the UNet gets and hands it back
        def forward(self, h, t, class_labels=None):
            seen.append(h)
            return type("Out", (), {"sample": h})()

    m.unet = Identity()
    assert torch.equal(m(x, t, y), x)  # unfolding inverts the folding exactly
    assert seen[0].shape == (2, 12, 16, 16)
    assert torch.equal(seen[0][:, :4, 0, 0], x[:, 0, :2, :2].flatten(1))  # channel c holds a 2x2 patch of c
    with pytest.raises(ValueError, match="model.patch_size is 3; expected a whole divisor of model.resolution"):
        tiny(resolution=32, patch_size=3)


def test_cpu_patch_preset_is_the_cpu_unet_on_folded_64x64_images():
    cpu = ConditionalUNet(**model_kwargs({"preset": "cpu", "conditioning": "scale_shift"}))
    m = ConditionalUNet(**model_kwargs({"preset": "cpu_patch", "conditioning": "scale_shift"})).eval()
    assert (m.config.resolution, m.config.patch_size) == (64, 2)
    assert (m.unet.config.sample_size, m.unet.config.in_channels, m.unet.config.out_channels) == (32, 12, 12)
    assert m.unet.config.block_out_channels == cpu.unet.config.block_out_channels
    extra = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in cpu.parameters())
    assert 0 < extra < 0.02 * sum(p.numel() for p in cpu.parameters())  # only the wider in/out convs
    y = torch.zeros(2, 24)
    y[0, 3] = y[1, [1, 20]] = 1
    with torch.no_grad():
        assert m(torch.randn(2, 3, 64, 64), torch.tensor([10, 900]), y).shape == (2, 3, 64, 64)


def test_exact_attention_gives_float64_gradients_at_large_logits():
    # q, k ~ 1000, as the mid block's late in a run: torch's fused CPU kernel is 24-54% off here
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(2, 1, 16, 32, generator=gen, dtype=torch.float64) for _ in range(4))
    q, k = q * 1000, k * 1000

    def grads(dtype, context):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        with context:
            out = torch.nn.functional.scaled_dot_product_attention(*inputs)
        out.backward(grad_out.to(dtype))
        return torch.cat([t.grad.double().flatten() for t in inputs])

    exact = grads(torch.float64, contextlib.nullcontext())
    ours = grads(torch.float32, exact_attention(torch.device("cpu")))
    assert (ours - exact).norm() / exact.norm() < 1e-4
    assert isinstance(exact_attention(torch.device("cuda")), contextlib.nullcontext)  # GPU kernels: torch's choice


def test_report_preset_size():
    m = ConditionalUNet(**model_kwargs({"preset": "report"}))
    assert 110e6 < sum(p.numel() for p in m.parameters()) < 118e6
    assert m.config.resolution == 64


def test_schedules_give_expected_betas():
    T, b0, b1 = 1000, 1e-4, 0.02
    lin = torch.linspace(b0, b1, T)
    expected = {
        "linear": lin,
        "scaled_linear": torch.linspace(b0 ** 0.5, b1 ** 0.5, T) ** 2,
        "sigmoid": torch.sigmoid(torch.linspace(-6, 6, T)) * (b1 - b0) + b0,
    }
    for name, betas in expected.items():
        assert torch.allclose(noise_scheduler(name).betas, betas, atol=1e-7), name
    # cosine (Nichol & Dhariwal 2021): alpha_bar(t) = cos^2(((t/T) + s)/(1 + s) * pi/2), beta <= 0.999
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    cos = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])
    assert torch.allclose(noise_scheduler("cosine").betas, cos, atol=1e-6)


def test_snr_shift_divides_the_signal_to_noise_ratio():
    base, shifted = noise_scheduler("cosine"), noise_scheduler("cosine", snr_shift=2.0)
    t = torch.tensor([0, 100, 500, 900])
    ratio = snr(shifted, t) / snr(base, t)
    assert torch.allclose(ratio, torch.full((4,), 0.25), rtol=1e-3)
    assert torch.equal(noise_scheduler("cosine", snr_shift=1.0).betas, base.betas)
    dpm = sampler_scheduler("dpmsolver++", shifted)  # samplers run on the shifted levels too
    assert torch.allclose(dpm.alphas_cumprod.float(), shifted.alphas_cumprod.float(), atol=1e-6)
    with pytest.raises(ValueError, match="diffusion.snr_shift is 0; expected a number > 0"):
        noise_scheduler("cosine", snr_shift=0)


def test_every_sampler_uses_the_training_noise_levels():
    for schedule in SCHEDULES:
        train = noise_scheduler(schedule)
        for name in SAMPLERS:
            s = sampler_scheduler(name, train)
            assert torch.allclose(s.alphas_cumprod.float(), train.alphas_cumprod.float(), atol=1e-6), (schedule, name)
            assert s.config.prediction_type == train.config.prediction_type


def test_bad_params_fail_with_allowed_values():
    with pytest.raises(ValueError, match=r"schedule 'cosin' unknown; expected one of \['linear', 'cosine'"):
        noise_scheduler("cosin")
    with pytest.raises(ValueError, match="prediction_type 'x0' unknown"):
        noise_scheduler("cosine", prediction_type="x0")
    with pytest.raises(ValueError, match=r"sample.sampler 'euler' unknown; expected one of \['ddpm'"):
        sampler_scheduler("euler", noise_scheduler("cosine"))
    with pytest.raises(ValueError, match="model.preset 'huge' unknown"):
        model_kwargs({"preset": "huge"})
    with pytest.raises(ValueError, match="model.conditioning 'text' unknown"):
        model_kwargs({"conditioning": "text"})
    with pytest.raises(ValueError, match="train.learning_rate is not a known key"):
        from_params(TrainConfig, {"learning_rate": 1}, "train")
    with pytest.raises(ValueError, match="train.lr_schedule 'step' unknown"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="train.mixed_precision 'fp8' unknown"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match=r"train.timestep_sampling 'lognormal' unknown; expected one of \['uniform'"):
        TrainConfig(timestep_sampling="lognormal")
    with pytest.raises(ValueError, match=r"train.timestep_sampling 'lognormal' unknown; expected one of \['uniform'"):
        sample_timesteps(4, 1000, "lognormal")


def test_logit_normal_timesteps_favour_the_middle_noise_levels():
    g = lambda: torch.Generator().manual_seed(0)
    uni = sample_timesteps(20000, 1000, "uniform", generator=g())
    ln = sample_timesteps(20000, 1000, "logit_normal", 1.0, generator=g())
    for t in (uni, ln):
        assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    mid = lambda t: ((t >= 250) & (t < 750)).float().mean().item()
    # P(250 <= t < 750): 0.5 uniform; P(|z| < ln 3) = 0.728 for z ~ N(0, 1) under logit-normal
    assert abs(mid(uni) - 0.5) < 0.02 and abs(mid(ln) - 0.728) < 0.02, (mid(uni), mid(ln))
    assert abs(ln.float().mean().item() - 499.5) < 10  # symmetric about T / 2
    wide = sample_timesteps(20000, 1000, "logit_normal", 2.0, generator=g())
    assert mid(wide) < mid(ln)  # a larger logit_std spreads toward the ends


def test_object_weight_is_a_weighted_mean_over_the_object_pixels():
    sched = noise_scheduler("cosine", prediction_type="epsilon")
    x0 = torch.full((2, 3, 16, 16), -0.2)  # image 0: a floor with one 3x3 red object; image 1: bare
    x0[0, :, 5:8, 6:9] = torch.tensor([0.8, -0.8, -0.8])[:, None, None]
    mask = object_mask(x0)
    f = mask[0].mean().item()  # the share of image 0 marked as object
    assert mask[1].sum() == 0 and 9 / 256 <= f < 0.2
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))  # what the loss draws first
    off_by_one_on_objects = lambda xt, t, y: noise + mask  # exact everywhere else
    loss = lambda w: diffusion_loss(off_by_one_on_objects, sched, x0, torch.zeros(2, 24), snr_gamma=None,
                                    generator=torch.Generator().manual_seed(1), object_weight=w).item()
    assert loss(0.0) == pytest.approx(f / 2, rel=1e-5)  # mean over pixels, then images
    assert loss(10.0) == pytest.approx(11 * f / (1 + 10 * f) / 2, rel=1e-5)
    with pytest.raises(UserError, match="train.object_weight is -1"):
        TrainConfig(object_weight=-1)


def test_self_condition_adds_the_estimate_as_input_channels(tmp_path):
    m = tiny(self_condition=True, patch_size=2).eval()
    assert m.unet.conv_in.in_channels == 2 * 3 * 4  # x and its estimate, each folded 2x2
    torch.nn.init.normal_(m.unet.conv_out.weight)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([500, 500]), torch.eye(24)[:2]
    est = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(m(x, t, y), m(x, t, y, torch.zeros_like(x)))  # no estimate = zeros
        assert not torch.allclose(m(x, t, y, est), m(x, t, y), atol=1e-4)
        m.save_pretrained(tmp_path / "sc")
        back = ConditionalUNet.from_pretrained(tmp_path / "sc").eval()
        assert back.config.self_condition and torch.equal(back(x, t, y, est), m(x, t, y, est))
    with pytest.raises(ValueError, match="without self_condition"):
        tiny()(x, t, y, est)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_noising(prediction_type):
    sched = noise_scheduler("cosine", prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 300, 700, 990])
    xt = sched.add_noise(x0, noise, t)
    target = sched.get_velocity(x0, noise, t) if prediction_type == "v_prediction" else noise
    assert torch.allclose(predicted_x0(sched, xt, t, target), x0, atol=2e-3)
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    per_unit = (1 - ab).sqrt() / (1 if prediction_type == "v_prediction" else ab.sqrt())
    moved = x0 - predicted_x0(sched, xt, t, target + 1)  # an output off by one moves x0 by this
    assert torch.allclose(moved, per_unit.expand_as(moved), rtol=1e-3, atol=1e-4)


def test_self_conditioned_loss_feeds_a_detached_estimate_on_half_the_batches():
    sched = noise_scheduler("cosine")
    m = tiny(self_condition=True)
    seen = []
    forward = m.forward
    m.forward = lambda x, t, y, x_self_cond=None: (seen.append((torch.is_grad_enabled(), x_self_cond)),
                                                   forward(x, t, y, x_self_cond))[1]
    g, x0 = torch.Generator().manual_seed(0), torch.rand(2, 3, 16, 16) * 2 - 1
    for _ in range(40):
        diffusion_loss(m, sched, x0, torch.eye(24)[:2], generator=g).backward()
    graded = [sc for grad, sc in seen if grad]  # the pass the loss is taken of
    first = [sc for grad, sc in seen if not grad]  # the pass that makes the estimate
    assert len(graded) == 40 and all(sc is None for sc in first)  # None: the model reads zeros
    with_estimate = [sc for sc in graded if sc is not None]
    assert len(with_estimate) == len(first) and 10 <= len(first) <= 30
    assert not any(sc.requires_grad for sc in with_estimate)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_overfits_a_fixed_batch(prediction_type, tiny_processed):
    sched = noise_scheduler("cosine", prediction_type=prediction_type)
    m = tiny()
    g = torch.Generator().manual_seed(0)
    images, y = load_processed(tiny_processed[0] / "iclevr.pt")
    x0, y = resize(to_model_range(images[:8]), 16), y[:8]
    fixed = lambda: diffusion_loss(m, sched, x0, y, snr_gamma=5.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = fixed().item()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        loss = diffusion_loss(m, sched, x0, y, snr_gamma=5.0, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = fixed().item()
    assert after < 0.4 * before, (before, after)
