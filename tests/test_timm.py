"""timm students and teachers (the timm extra): the curated zoo builds and trains at small and large inputs, small
inputs get a stride-1 stem, reparameterisable students fuse to the same function, a timm checkpoint is a teacher,
and a recipe naming timm without the extra fails at load with the pip command."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgedistill.base.errors import InputError, RecipeError
from edgedistill.models import timm_zoo
from edgedistill.models.onnx_export import export_copy
from edgedistill.models.students import allows_small_stem, build_classifier, build_student, zoo
from edgedistill.models.teachers import load_teacher
from edgedistill.recipe.schema import validate_recipe

timm = pytest.importorskip("timm", reason="the timm extra is not installed")

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.26, 0.27)
CURATED = [timm_zoo.PREFIX + n for n in timm_zoo.CURATED]


def student(arch: str, size: int, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_student(arch, 5, image_size=size, mean=MEAN, std=STD, **kw)


def first_convs(net: nn.Module) -> list[nn.Conv2d]:
    names = net.net.pretrained_cfg["first_conv"]
    modules = dict(net.net.named_modules())
    return [modules[n] for n in ((names,) if isinstance(names, str) else names)]


def test_the_zoo_lists_the_curated_timm_students_after_the_registered_ones():
    archs = zoo()
    assert archs[-len(CURATED):] == CURATED and "mobilenet_v2" in archs


@pytest.mark.parametrize("arch", CURATED)
def test_curated_student_trains_a_step_at_32px_with_a_stride1_stem(arch):
    net = student(arch, 32)
    assert allows_small_stem(arch)
    assert all(tuple(c.stride) == (1, 1) for c in first_convs(net))
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4) % 5
    out = net.train()(x)
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert net.eval()(x[:1]).shape == (1, 5)


@pytest.mark.parametrize("arch", ["timm/lcnet_050", "timm/mobileone_s0"])
def test_large_inputs_keep_timm_stem(arch):
    assert all(tuple(c.stride) == (2, 2) for c in first_convs(student(arch, 96)))
    assert all(tuple(c.stride) == (2, 2) for c in first_convs(student(arch, 16, small_input=False)))


@pytest.mark.parametrize("arch", ["timm/repvit_m0_9", "timm/mobileone_s0", "timm/fastvit_t8"])
@pytest.mark.parametrize("size", [16, 64])
def test_reparameterised_student_computes_what_the_trained_one_does(arch, size):
    """The fused copy export makes equals the training-time network, also with the stride-1 stem (a MobileOne or
    FastViT block builds its fused convolution from its own stride, which the small stem must change too)."""
    net = student(arch, size).train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.rand(4, 3, size, size))
    net.eval()
    fused, prepared = export_copy(net)
    assert prepared["reparameterized"] > 0
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in net.parameters())
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        want, got = net(x), fused(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_width_is_the_name_of_a_timm_student():
    with pytest.raises(InputError, match="width is its name"):
        build_student("timm/lcnet_050", 5, image_size=16, mean=MEAN, std=STD, width=0.5)
    with pytest.raises(RecipeError, match="timm/lcnet_050 has no width multiplier"):
        validate_recipe({"student": {"arch": "timm/lcnet_050", "width": 0.5}})


def test_an_unknown_timm_name_is_refused_at_load_with_the_closest():
    with pytest.raises(RecipeError, match=r"student.arch: timm has no model 'mobilenetv4_conv_smal' \(did you mean 'mobilenetv4_conv_small'\?\)"):
        validate_recipe({"student": {"arch": "timm/mobilenetv4_conv_smal"}})


def test_without_the_extra_a_timm_recipe_fails_at_load_with_the_pip_command(monkeypatch):
    monkeypatch.setattr(timm_zoo, "installed", lambda: False)
    with pytest.raises(RecipeError, match=r"student.arch: timm/lcnet_050 is a timm model and timm is not installed \(pip install 'edgedistill\[timm\]'\)"):
        validate_recipe({"student": {"arch": "timm/lcnet_050"}})
    with pytest.raises(RecipeError, match=r"teacher.arch: .*pip install 'edgedistill\[timm\]'"):
        validate_recipe({"teacher": {"source": "timm", "arch": "resnet18", "path": __file__}})
    assert timm_zoo.curated_archs() == [] and all(not a.startswith("timm/") for a in zoo())


def test_an_input_too_small_for_the_architecture_is_named():
    with pytest.raises(InputError, match=r"student.arch: timm/ghostnetv2_100 does not take 8x8 images"):
        student("timm/ghostnetv2_100", 8)


def test_a_teacher_trained_here_may_be_a_timm_network():
    net = build_classifier("timm/lcnet_050", 5, image_size=16)
    assert net(torch.rand(2, 3, 16, 16)).shape == (2, 5)


# ---------------------------------------------------------------- teachers from timm checkpoints


def teacher_cfg(path, **kw):
    return validate_recipe({"teacher": {"source": "timm", "arch": "lcnet_050", "path": str(path), **kw}}).teacher


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_a_timm_checkpoint_is_a_frozen_teacher_normalised_as_pretrained(tmp_path, fmt):
    torch.manual_seed(1)
    ref = timm.create_model("lcnet_050", pretrained=False, num_classes=5).eval()
    path = tmp_path / f"teacher.{fmt}"
    if fmt == "pth":
        torch.save(ref.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(ref.state_dict(), str(path))
    net = load_teacher(teacher_cfg(path), 5, 32, mean=(0.1,) * 3, std=(0.9,) * 3)
    mean, std = timm.get_pretrained_cfg("lcnet_050").mean, timm.get_pretrained_cfg("lcnet_050").std
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = ref((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        assert torch.allclose(net(x), want, atol=1e-5)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training

    own = load_teacher(teacher_cfg(path, normalize={"mean": [0.5] * 3, "std": [0.5] * 3}), 5, 32, mean=MEAN, std=STD)
    with torch.no_grad():
        assert torch.allclose(own(x), ref((x - 0.5) / 0.5), atol=1e-5)


def test_a_timm_checkpoint_for_other_classes_is_named(tmp_path):
    torch.save(timm.create_model("lcnet_050", pretrained=False, num_classes=7).state_dict(), tmp_path / "t.pth")
    with pytest.raises(InputError, match=r"teacher.path: .*t.pth does not fit timm model 'lcnet_050' with 5 classes"):
        load_teacher(teacher_cfg(tmp_path / "t.pth"), 5, 32, mean=MEAN, std=STD)
