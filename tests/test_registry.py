"""The backbone registry: one name per network everywhere, old names still read, and every
backbone gives the global feature the ReID model uses."""

from __future__ import annotations

import typing

import pytest
import torch

from common.errors import UserError
from models.registry import BACKBONES, BackboneSpec, create_backbone, legacy_mmgl_backbone, spec_from_dict
from models.reid import ReIDModel
from models.resnet import resnet_tiny_test
from models.vit import vit_tiny_test
from train.finetune import Arch
from train.methods.mmgl import BACKBONES as MMGL_BACKBONES
from train.methods.mmgl import MMGLConfig
from train.methods.pass_method import ARCHS as PASS_ARCHS
from train.methods.pass_method import PASSConfig


def test_every_tool_names_networks_from_the_registry():
    assert set(typing.get_args(Arch)) == set(BACKBONES)
    assert set(MMGL_BACKBONES) == set(typing.get_args(typing.get_type_hints(MMGLConfig)["backbone"]))
    assert set(MMGL_BACKBONES) == {n for n, e in BACKBONES.items() if e.family == "resnet"}
    assert set(PASS_ARCHS) == set(typing.get_args(typing.get_type_hints(PASSConfig)["arch"]))
    assert set(PASS_ARCHS) == {n for n, e in BACKBONES.items() if e.family == "vit"}


@pytest.mark.parametrize("name, reference", [
    ("resnet_tiny_two_stream", lambda: resnet_tiny_test(two_stream=True)),
    ("resnet_tiny", resnet_tiny_test),
    ("vit_tiny", lambda: vit_tiny_test(img_size=(64, 32))),
])
def test_registry_builds_the_factory_network_and_its_global_feature(name, reference):
    torch.manual_seed(0)
    built = create_backbone(name, (64, 32))
    torch.manual_seed(0)
    expected = reference()
    assert built.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in built.state_dict().items())
    images, modality = torch.randn(4, 3, 64, 32), torch.tensor([0, 1, 0, 1])
    built.eval()
    with torch.no_grad():
        feature = built.global_feature(images, modality)
        assert feature.shape == (4, built.feature_dim)
        if name.startswith("vit"):  # cat(CLS, mean of the parts), written out
            out = built(images)
            assert torch.allclose(feature, torch.cat([out.cls, out.parts.mean(1)], 1))
        else:  # GeM p = 3 of the map, written out
            fmap = built(images, modality) if name.endswith("two_stream") else built(images)
            assert torch.allclose(feature, fmap.clamp(min=0).pow(3).mean((2, 3)).add(1e-12).pow(1 / 3), atol=1e-6)
    model = ReIDModel(built, 5).eval()
    assert model.feature_dim == built.feature_dim
    with torch.no_grad():
        assert torch.equal(model.embed(images, modality, "pre_bn"), feature)


def test_old_names_are_read():
    assert spec_from_dict({"factory": "models.resnet:resnet_tiny_test", "kwargs": {"two_stream": True}}) == \
        BackboneSpec("resnet_tiny_two_stream", {})
    assert spec_from_dict({"factory": "models.vit:vit_tiny_test", "kwargs": {"num_parts": 3}}) == \
        BackboneSpec("vit_tiny", {"num_parts": 3})
    assert spec_from_dict({"name": "vit_tiny_test"}).name == "vit_tiny"
    assert legacy_mmgl_backbone("narrow", True) == "resnet_narrow_two_stream"
    assert legacy_mmgl_backbone("resnet50", False) == "resnet50"
    with pytest.raises(UserError, match="unknown backbone"):
        create_backbone("resnet101")


def test_spec_rebuilds_with_json_lists():
    spec = BackboneSpec("vit_tiny", {"num_parts": 2, "img_size": [64, 32]})
    model = spec.build()
    assert model.num_parts == 2 and model.img_size == (64, 32)
    assert spec_from_dict(spec.to_dict()) == spec
