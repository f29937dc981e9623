import json
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cytofuse.errors import InputError
from cytofuse.models import (
    ResNetEncoder,
    branch_validation_weights,
    channel_slice,
    SmallCNN,
    adapt_first_conv,
    count_parameters,
    create_encoder,
    create_model,
    list_encoders,
    list_models,
    load_encoder_weights,
    load_model,
    load_weights,
    read_model_config,
    save_weights,
)

FEATURES = {"smallcnn": 128, "resnet18": 512}


def _model(name, c=3, k=4, encoder="smallcnn", **kw):
    if name == "single":
        kw.setdefault("channel", c - 1)
    torch.manual_seed(0)
    return create_model(name, in_channels=c, num_classes=k, encoder=encoder, **kw).eval()


# ---------------------------------------------------------------- shapes and structure


@pytest.mark.parametrize("encoder", ["smallcnn", "resnet18"])
@pytest.mark.parametrize("name", ["early", "intermediate", "late", "single"])
@pytest.mark.parametrize("c", [1, 3])
def test_shapes_of_every_fusion_and_encoder(name, encoder, c):
    model = _model(name, c=c, k=5, encoder=encoder)
    x = torch.randn(2, c, 64, 64)
    with torch.no_grad():
        logits, feats = model(x), model.forward_features(x)
        refit = model.head(feats)
    per_channel = name in ("intermediate", "late")
    assert logits.shape == (2, 5)
    assert feats.shape == (2, FEATURES[encoder] * (c if per_channel else 1))
    torch.testing.assert_close(refit, logits)
    assert (model.fusion, model.encoder_name, model.in_channels, model.num_classes) == (name, encoder, c, 5)


def test_gradcam_layers_are_the_last_block_of_each_encoder():
    early, inter, late = (_model(n, c=3, encoder="resnet18") for n in ("early", "intermediate", "late"))
    single = _model("single", c=3, channel=1)
    assert early.gradcam_layers() == {"all": early.encoder.layer4}
    assert inter.gradcam_layers() == {f"ch{i}": inter.encoders[i].layer4 for i in range(3)}
    assert list(late.gradcam_layers()) == ["ch0", "ch1", "ch2"]
    assert single.gradcam_layers() == {"ch1": single.encoder.blocks[-1]}


def test_gradcam_layer_output_is_a_spatial_map():
    model = _model("intermediate", c=2, encoder="smallcnn")
    seen = {}
    for key, layer in model.gradcam_layers().items():
        layer.register_forward_hook(lambda m, i, o, key=key: seen.update({key: tuple(o.shape)}))
    model(torch.randn(1, 2, 64, 64))
    assert seen == {"ch0": (1, 128, 8, 8), "ch1": (1, 128, 8, 8)}


def test_gradcam_layer_names_work_with_monai_gradcam():
    from monai.visualize import GradCAM

    model = _model("intermediate", c=2, encoder="resnet18")
    names = model.gradcam_layer_names()
    assert names == {"ch0": "encoders.0.layer4", "ch1": "encoders.1.layer4"}
    assert _model("early", c=2).gradcam_layer_names() == {"all": "encoder.blocks.3"}
    cam = GradCAM(nn_module=model, target_layers=names["ch1"])(torch.randn(2, 2, 64, 64))
    assert cam.shape == (2, 1, 64, 64)
    assert float(cam.min()) == 0.0 and float(cam.max()) == 1.0


def test_per_channel_encoders_take_one_channel_and_early_takes_all():
    assert _model("early", c=3, encoder="resnet18").encoder.conv1.in_channels == 3
    inter = _model("intermediate", c=3, encoder="resnet18")
    assert [e.conv1.in_channels for e in inter.encoders] == [1, 1, 1]
    assert inter.encoders[0].conv1.stride == (2, 2) and inter.encoders[0].conv1.kernel_size == (7, 7)


def test_single_uses_only_its_channel():
    model = _model("single", c=3, channel=1)
    x = torch.randn(4, 3, 32, 32)
    y = x.clone()
    y[:, [0, 2]] = torch.randn(4, 2, 32, 32) * 5
    z = x.clone()
    z[:, 1] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(y), model(x))
        assert not torch.allclose(model(z), model(x))


def test_channels_last_input_gives_the_same_output():
    model = _model("intermediate", c=3, encoder="resnet18")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_wrong_number_of_input_channels_is_refused():
    model = _model("intermediate", c=3)
    with pytest.raises(InputError, match=r"expects x of shape \(B, 3, H, W\), got \(2, 2, 32, 32\)"):
        model(torch.randn(2, 2, 32, 32))


# ---------------------------------------------------------------- late fusion


def _branch_probs(model, x):
    return torch.softmax(model.forward_branches(x), dim=2)


def test_late_equal_weights_is_the_mean_of_branch_probabilities():
    model = _model("late", c=3, late_weights="equal")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = torch.softmax(model(x), dim=1)
        expected = _branch_probs(model, x).mean(dim=1)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(model(x).exp().sum(1), torch.ones(3))  # log-probabilities
    assert not any(p is model.head.weight_logits for p in model.parameters())


def test_late_fixed_and_set_weights():
    model = _model("late", c=3, late_weights=[2.0, 1.0, 1.0])
    torch.testing.assert_close(model.branch_weights, torch.tensor([0.5, 0.25, 0.25]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.softmax(model(x), 1), (_branch_probs(model, x) * model.branch_weights.view(1, 3, 1)).sum(1)
        )
        model.set_branch_weights([0.0, 0.0, 3.0])
        torch.testing.assert_close(torch.softmax(model(x), 1), _branch_probs(model, x)[:, 2])
        fused, branches = model.forward_all(x)
    torch.testing.assert_close(fused, model(x))
    assert branches.shape == (2, 3, 4)
    with pytest.raises(InputError, match=r"3 finite non-negative numbers.*\[1\.0, -1\.0, 1\.0\]"):
        model.set_branch_weights([1.0, -1.0, 1.0])
    with pytest.raises(InputError, match="3 finite non-negative"):
        create_model("late", in_channels=3, num_classes=2, encoder="smallcnn", late_weights=[1, 1])


def test_late_learned_weights_start_equal_and_receive_gradients():
    model = _model("late", c=2).train()
    torch.testing.assert_close(model.branch_weights, torch.tensor([0.5, 0.5]))
    assert any(p is model.head.weight_logits for p in model.parameters())
    loss = nn.CrossEntropyLoss()(model(torch.randn(4, 2, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model.head.weight_logits.grad is not None
    assert model.head.weight_logits.grad.abs().sum() > 0


def test_cross_entropy_on_late_output_is_nll_of_fused_probability():
    model = _model("late", c=2, late_weights=[0.3, 0.7])
    x, y = torch.randn(5, 2, 32, 32), torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        p = (_branch_probs(model, x) * torch.tensor([0.3, 0.7]).view(1, 2, 1)).sum(1)
        expected = -p[torch.arange(5), y].log().mean()
        torch.testing.assert_close(nn.CrossEntropyLoss()(model(x), y), expected)


def test_branch_validation_weights_favour_accurate_branches():
    y = torch.tensor([0, 0, 1, 1])
    logits = torch.zeros(4, 3, 2)
    logits[:, 0, :] = nn.functional.one_hot(y, 2) * 5.0  # branch 0: always right
    logits[:, 1, :] = nn.functional.one_hot(torch.tensor([0, 1, 1, 1]), 2) * 5.0  # balanced acc 0.75
    logits[:, 2, :] = nn.functional.one_hot(1 - y, 2) * 5.0  # always wrong
    torch.testing.assert_close(branch_validation_weights(logits, y), torch.tensor([2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(branch_validation_weights(logits[:, 2:], y), torch.tensor([1.0]))
    model = _model("late", c=3, late_weights="validation")
    torch.testing.assert_close(model.branch_weights, torch.full((3,), 1 / 3))
    model.set_branch_weights(branch_validation_weights(logits, y))
    torch.testing.assert_close(model.branch_weights[:2], torch.tensor([2 / 3, 1 / 3]))


def test_channel_slice_is_dense_in_the_batch_memory_format():
    x = torch.randn(2, 3, 8, 8)
    assert channel_slice(x, 1).is_contiguous()
    xl = x.to(memory_format=torch.channels_last)
    assert channel_slice(xl, 1).stride() == (64, 1, 8, 1)
    torch.testing.assert_close(channel_slice(xl, 2), x[:, 2:3])


@pytest.mark.parametrize("name", ["early", "intermediate", "late", "single"])
def test_models_learn_a_channel_intensity_task(name):
    # class = whether channel 1 is bright; every model sees channel 1 (single uses it alone)
    torch.manual_seed(0)
    model = create_model(name, in_channels=2, num_classes=2, encoder="smallcnn", dropout=0.0,
                         channel=1 if name == "single" else None)
    y = torch.arange(16) % 2
    x = torch.randn(16, 2, 16, 16)
    x[:, 1] += 2.0 * y.view(-1, 1, 1).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = nn.CrossEntropyLoss()(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- registry and validation


def test_registry_lists_names():
    assert list_models() == ["early", "intermediate", "late", "single"]
    assert list_encoders() == ["resnet18", "resnet34", "resnet50", "smallcnn"]


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(InputError, match=re.escape("['early', 'intermediate', 'late', 'single'], got 'mid'")):
        create_model("mid", in_channels=3, num_classes=2)
    with pytest.raises(InputError, match=re.escape("'resnet50', 'smallcnn'], got 'vgg16'")):
        create_model("early", in_channels=3, num_classes=2, encoder="vgg16")
    with pytest.raises(InputError, match="got 'vgg16'"):
        create_encoder("vgg16", in_channels=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "single"}, "channel is required"),
        ({"name": "single", "channel": 3}, r"channel must be an index in \[0, 2\], got 3"),
        ({"name": "single", "channel": -1}, r"got -1"),
        ({"name": "early", "channel": 0}, "only used by model 'single'"),
        ({"name": "early", "in_channels": 0}, "in_channels must be an int >= 1, got 0"),
        ({"name": "early", "num_classes": 1}, "num_classes must be an int >= 2, got 1"),
        ({"name": "early", "dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"name": "late", "late_weights": "best"}, "late_weights must be.*got 'best'"),
        ({"name": "late", "late_weights": 3}, "late_weights must be.*got 3"),
        ({"name": "early", "dropout": "0.4"}, "dropout must be in.*got '0.4'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {"in_channels": 3, "num_classes": 2, "encoder": "smallcnn", **kwargs}
    with pytest.raises(InputError, match=message):
        create_model(args.pop("name"), **args)


def test_numpy_integers_are_accepted_and_config_is_json():
    np = pytest.importorskip("numpy")
    model = create_model("single", in_channels=np.int64(3), num_classes=np.int64(2), encoder="smallcnn",
                         channel=np.int64(2), dropout=np.float32(0.5))
    assert model.channel == 2 and model.in_channels == 3
    assert json.loads(json.dumps(model.config))["dropout"] == 0.5


def test_dropout_and_hidden_head():
    model = create_model("intermediate", in_channels=2, num_classes=3, encoder="smallcnn",
                         dropout=0.25, hidden=64)
    drops = [m.p for m in model.head if isinstance(m, nn.Dropout)]
    linears = [(m.in_features, m.out_features) for m in model.head if isinstance(m, nn.Linear)]
    assert drops == [0.25, 0.25] and linears == [(256, 64), (64, 3)]


def test_resnet50_parameter_counts_match_the_paper_scale():
    # torchvision resnet50 without fc has 23,508,032 parameters; 1-channel conv1 has 6,272 fewer
    assert count_parameters(ResNetEncoder("resnet50", in_channels=3)) == 23_508_032
    counts = {n: count_parameters(create_model(n, in_channels=3, num_classes=6, encoder="resnet50"))
              for n in ("early", "intermediate", "late")}
    assert counts["early"] == 23_508_032 + 2048 * 6 + 6
    assert counts["intermediate"] == 3 * 23_501_760 + 3 * 2048 * 6 + 6
    assert counts["late"] == counts["intermediate"] + 2 * 6 + 3  # 3 heads' biases + learned weights
    assert 23e6 <= counts["early"] <= 26e6 and 70e6 <= counts["intermediate"] <= 72e6


def test_count_parameters_trainable_only():
    model = create_model("early", in_channels=1, num_classes=2, encoder="smallcnn")
    total = count_parameters(model)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    assert count_parameters(model) == 128 * 2 + 2
    assert count_parameters(model, trainable_only=False) == total


# ---------------------------------------------------------------- pretrained weights


def _torchvision_state(seed=1, in_channels=3):
    """A torchvision-named resnet18 state dict (with its 1000-class fc) built from our encoder."""
    torch.manual_seed(seed)
    enc = ResNetEncoder("resnet18", in_channels=in_channels)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running stats
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    return state


@pytest.fixture(scope="module")
def tv_state():
    return _torchvision_state()


@pytest.fixture(params=["pth", "safetensors"])
def weight_file(request, tmp_path, tv_state):
    path = tmp_path / f"resnet18.{request.param}"
    if request.param == "pth":
        torch.save(tv_state, path)
    else:
        save_file(tv_state, str(path))
    return path


def _assert_rest_equal(encoder, state):
    for key, value in encoder.state_dict().items():
        if key != "conv1.weight":
            assert torch.equal(value, state[key]), key


def test_load_into_one_channel_encoder_sums_rgb(weight_file, tv_state):
    enc = ResNetEncoder("resnet18", in_channels=1)
    report = load_encoder_weights(enc, weight_file)
    assert torch.equal(enc.conv1.weight, tv_state["conv1.weight"].sum(1, keepdim=True))
    _assert_rest_equal(enc, tv_state)
    assert report.adapted == ("conv1.weight",)
    assert report.missing == () and report.unexpected == ()
    assert report.dropped == ("fc.bias", "fc.weight")
    assert len(report.loaded) == len(enc.state_dict())


def test_load_into_n_channel_encoder_tiles_and_rescales(tv_state, tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv_state.items()}}, path)
    enc = ResNetEncoder("resnet18", in_channels=5)
    report = load_encoder_weights(enc, path)
    w = tv_state["conv1.weight"]
    expected = torch.cat([w, w[:, :2]], dim=1) * (3 / 5)
    torch.testing.assert_close(enc.conv1.weight.data, expected)
    _assert_rest_equal(enc, tv_state)
    assert report.adapted == ("conv1.weight",)


def test_adapt_first_conv_keeps_the_response_to_a_flat_image():
    w = torch.randn(8, 3, 3, 3)
    for n in (1, 3, 6, 9):  # whole multiples of the source channels: the same flat-image response
        torch.testing.assert_close(adapt_first_conv(w, n).sum(1), w.sum(1))
    torch.testing.assert_close(adapt_first_conv(w, 2), w[:, :2] * 1.5)
    assert adapt_first_conv(w, 4).shape == (8, 4, 3, 3)


def test_missing_and_unexpected_keys_are_reported_by_name(tv_state, tmp_path):
    state = dict(tv_state)
    del state["layer4.1.bn2.running_var"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    report = load_encoder_weights(ResNetEncoder("resnet18", in_channels=3), path)
    assert report.missing == ("layer4.1.bn2.running_var",)
    assert report.unexpected == ("extra.weight",)
    assert report.adapted == ()
    assert "layer4.1.bn2.running_var" in str(report)
    with pytest.warns(UserWarning, match=r"1 encoder tensors are not in the file.*running_var"):
        create_model("intermediate", in_channels=2, num_classes=2, pretrained=path)


def test_shape_mismatch_names_file_key_and_shapes(tv_state, tmp_path):
    state = dict(tv_state)
    state["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    msg = re.escape(f"{path}: key 'layer2.0.conv1.weight' has shape (128, 32, 3, 3) in the file "
                    "but (128, 64, 3, 3)")
    with pytest.raises(InputError, match=msg):
        load_encoder_weights(ResNetEncoder("resnet18", in_channels=1), path)


def test_unusable_weight_files_raise(tmp_path):
    with pytest.raises(InputError, match="weights file not found"):
        load_encoder_weights(SmallCNN(in_channels=1), tmp_path / "none.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read weights file"):
        load_encoder_weights(SmallCNN(in_channels=1), garbage)
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    with pytest.raises(InputError, match="no tensor matches"):
        load_encoder_weights(SmallCNN(in_channels=1), other)


def test_create_model_pretrained_applies_to_every_encoder(weight_file, tv_state):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = create_model("late", in_channels=3, num_classes=6, pretrained=weight_file)
    summed = tv_state["conv1.weight"].sum(1, keepdim=True)
    for enc in model.encoders:
        assert torch.equal(enc.conv1.weight, summed)
        _assert_rest_equal(enc, tv_state)
    assert set(model.pretrained_reports) == {"ch0", "ch1", "ch2"}
    early = create_model("early", in_channels=3, num_classes=6, pretrained=weight_file)
    assert torch.equal(early.encoder.conv1.weight, tv_state["conv1.weight"])
    assert early.pretrained_reports["all"].adapted == ()


# ---------------------------------------------------------------- save / load


def test_save_and_load_weights_round_trip(tmp_path):
    model = _model("late", c=2, late_weights="equal")
    model.set_branch_weights([1.0, 3.0])
    path = save_weights(model, tmp_path / "sub" / "model.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]
    other = load_weights(_model("late", c=2, late_weights="equal").eval(), path)
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))
    torch.testing.assert_close(other.branch_weights, torch.tensor([0.25, 0.75]))
    assert read_model_config(path)["name"] == "late"
    rebuilt = load_model(path)
    assert rebuilt.fusion == "late" and not rebuilt.training
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_load_weights_errors_name_file_and_key(tmp_path):
    path = save_weights(_model("intermediate", c=2, k=3), tmp_path / "m.safetensors")
    msg = re.escape(f"{path}: key 'head.1.weight' has shape (3, 256) in the file but (5, 256) in the model")
    with pytest.raises(InputError, match=msg):
        load_weights(_model("intermediate", c=2, k=5), path)
    with pytest.raises(InputError, match=r"missing keys \['encoders.2"):
        load_weights(_model("intermediate", c=3, k=3), path)
    with pytest.raises(InputError, match="must be a .safetensors file"):
        load_weights(_model("intermediate", c=2, k=3), tmp_path / "m.pth")


@pytest.mark.parametrize("name", ["early", "intermediate", "late", "single"])
def test_models_export_to_onnx_with_a_dynamic_batch(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _model(name, c=2, encoder="smallcnn")
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. TracerWarning from data-dependent Python control flow
        # the legacy (TorchScript) exporter itself is deprecated in this torch; that is not ours
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (torch.randn(1, 2, 32, 32),), str(path), dynamo=False,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}})
    x = torch.randn(3, 2, 32, 32)
    out = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-5, rtol=1e-4)
