"""The chapters' CNNs: shapes, parameter counts, batchnorm from the equations, a training step on real
Fashion-MNIST, torchvision adaptation, and rebuilding models by name."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learnkit.models import (MODELS, BatchNorm, ConvBN, DepthwiseSeparableConv, Flatten, ResBlock, SEBlock, conv,
                             get_model, init_cnn, register_model, simple_cnn, torchvision_model)

CLASSIC = sorted(set(MODELS) - {'simple_cnn', 'torchvision_model', 'vision_model'})


@pytest.fixture(scope='module')
def batch(fmnist):
    "16 Fashion-MNIST training images, standardised, with their labels."
    x = fmnist.x_train[:16, None].float() / 255
    return (x - x.mean()) / x.std(), fmnist.y_train[:16]


def hooked_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    "Forward `x` with a hook on every module that has its own parameters; return the output and the hook counts."
    calls = {}
    def count(name):
        def hook(module, inp, out): calls[name] = calls.get(name, 0) + 1
        return hook
    handles = [m.register_forward_hook(count(n)) for n, m in model.named_modules()
               if any(True for _ in m.parameters(recurse=False))]
    try: return model(x), calls
    finally:
        for h in handles: h.remove()


def n_params(model: nn.Module) -> int: return sum(p.numel() for p in model.parameters())


# ---- shapes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', CLASSIC)
@pytest.mark.parametrize('in_ch,size', [(1, 28), (3, 96)])
def test_classic_models_map_any_input_size_to_n_out_and_use_every_layer(name, in_ch, size):
    model = get_model(name, n_out=5, in_ch=in_ch).eval()
    with torch.no_grad(): out, calls = hooked_forward(model, torch.randn(2, in_ch, size, size))
    assert out.shape == (2, 5)
    with_params = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    assert calls == {n: 1 for n in with_params}  # the diagnostics hooks see every parameterised layer once


@pytest.mark.parametrize('name', ['resnet18', 'resnet34', 'se_resnet'])
def test_small_input_stem_keeps_28px_grid_in_the_first_stage(name):
    model = get_model(name, small_input=True).eval()
    with torch.no_grad(): stem_out = model[0](torch.randn(2, 1, 28, 28))
    assert stem_out.shape == (2, 64, 28, 28)
    with torch.no_grad(): assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_simple_cnn_is_the_chapters_network():
    model = simple_cnn()
    assert isinstance(model, nn.Sequential) and isinstance(model[-1], Flatten) and len(model) == 6
    first = model[0][0]
    assert (first.in_channels, first.out_channels, first.kernel_size, first.stride, first.padding) == (1, 8, (5, 5), (2, 2), (2, 2))
    assert [m[0].out_channels for m in model[:5]] == [8, 16, 32, 64, 10]
    assert not isinstance(model[4][-1], nn.ReLU)  # the last block has no activation
    x = torch.randn(2, 1, 28, 28)
    assert [tuple(model[:i + 1](x).shape[2:]) for i in range(5)] == [(14, 14), (7, 7), (4, 4), (2, 2), (1, 1)]
    assert model(x).shape == (2, 10)
    assert simple_cnn(bn=True, n_out=3, in_ch=3)(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_simple_cnn_parameter_counts_follow_the_chapters_arithmetic():
    # (ni, nf, ks) of the five blocks; each conv has nf*ni*ks*ks weights and nf biases
    blocks = [(1, 8, 5), (8, 16, 3), (16, 32, 3), (32, 64, 3), (64, 10, 3)]
    assert n_params(simple_cnn()) == 8*1*25+8 + 16*8*9+16 + 32*16*9+32 + 64*32*9+64 + 10*64*9+10 == 30_282
    # with BN: no conv bias (BN's beta replaces it), plus gamma and beta per channel
    assert n_params(simple_cnn(bn=True)) == sum(nf*ni*ks*ks + 2*nf for ni, nf, ks in blocks) == 30_412
    model = simple_cnn(bn=True)
    assert all(isinstance(m[1], nn.BatchNorm2d) and m[0].bias is None for m in model[:5])


# ---- blocks ---------------------------------------------------------------------------------------

def test_conv_block_options_give_the_expected_grids():
    x = torch.randn(2, 4, 14, 14)
    assert conv(4, 6)(x).shape == (2, 6, 7, 7)  # stride 2 by default
    assert conv(4, 6, ks=1, stride=1)(x).shape == (2, 6, 14, 14)
    assert conv(4, 6, stride=1, dilation=2)(x).shape == (2, 6, 14, 14)
    assert conv(4, 6, transpose=True)(x).shape == (2, 6, 28, 28)
    assert conv(4, 6, ks=4, transpose=True)(x).shape == (2, 6, 28, 28)
    with pytest.raises(ValueError, match='pass padding= yourself'): conv(4, 6, ks=4, stride=1, transpose=True)
    assert [type(m) for m in conv(4, 6, bn=True)] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert conv(4, 6, bn=True)[0].bias is None and conv(4, 6)[0].bias is not None
    assert [type(m) for m in ConvBN(4, 6, act=False)] == [nn.Conv2d, nn.BatchNorm2d]


def test_depthwise_separable_conv_is_a_depthwise_then_a_pointwise_conv():
    block = DepthwiseSeparableConv(8, 16, stride=2)
    depthwise, pointwise = block[0][0], block[1][0]
    assert depthwise.groups == 8 and depthwise.weight.shape == (8, 1, 3, 3)
    assert pointwise.weight.shape == (16, 8, 1, 1)
    assert block(torch.randn(2, 8, 14, 14)).shape == (2, 16, 7, 7)


def test_se_block_scales_each_channel_by_a_gate_in_0_1():
    x = torch.rand(2, 32, 5, 5) + 0.5
    ratio = SEBlock(32, reduction=8)(x) / x
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio))  # one gate per channel
    assert ((ratio > 0) & (ratio < 1)).all()


def test_res_block_shortcut_follows_stride_and_width():
    assert isinstance(ResBlock(8, 8).shortcut, nn.Identity)
    down = ResBlock(8, 16, stride=2)
    assert isinstance(down.shortcut, ConvBN) and down(torch.randn(2, 8, 14, 14)).shape == (2, 16, 7, 7)


def test_init_cnn_gives_kaiming_weights_and_zero_biases():
    torch.manual_seed(0)
    model = init_cnn(nn.Sequential(nn.Conv2d(64, 128, 3), nn.Linear(256, 512)))
    assert abs(model[0].weight.std().item() - (2 / (64 * 9)) ** 0.5) < 0.005
    assert abs(model[1].weight.std().item() - (2 / 256) ** 0.5) < 0.005
    assert (model[0].bias == 0).all() and (model[1].bias == 0).all()


# ---- BatchNorm from the equations ------------------------------------------------------------------

@pytest.mark.parametrize('shape,reference', [((16, 6), nn.BatchNorm1d), ((8, 6, 5, 5), nn.BatchNorm2d)])
def test_batchnorm_from_the_equations_matches_torch(shape, reference):
    torch.manual_seed(0)
    ours, theirs = BatchNorm(6, momentum=0.2), reference(6, momentum=0.2)
    with torch.no_grad(): ours.weight.uniform_(0.5, 2); ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    for step in range(4):
        x = torch.randn(shape) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
        (ya * x).sum().backward(); (yb * x).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-5, rtol=1e-5)  # unbiased variance
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-5)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 4
    ours.eval(); theirs.eval()
    x = torch.randn(shape) * 3 + 1
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_batchnorm_rejects_inputs_it_cannot_normalise():
    with pytest.raises(ValueError, match=r'BatchNorm\(6\) takes'): BatchNorm(6)(torch.randn(4, 6, 5))
    with pytest.raises(ValueError, match='more than one value per channel'): BatchNorm(6)(torch.randn(1, 6))


# ---- one training step on real data ----------------------------------------------------------------

@pytest.mark.parametrize('name,kwargs', [('simple_cnn', {}), ('simple_cnn', {'bn': True}), ('resnet18', {'small_input': True})]
                         + [(n, {}) for n in CLASSIC])
def test_one_adam_step_lowers_the_loss_on_a_fashion_mnist_batch(batch, name, kwargs):
    x, y = batch
    torch.manual_seed(0)
    model = get_model(name, **kwargs)
    # Adam's first step moves every weight by about lr: at 1e-3 the wide FC layers of AlexNet and VGG
    # overshoot (the reason for fit_one_cycle's warm-up), so the step here is 1e-4.
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    def loss():
        torch.manual_seed(1)  # the same dropout masks before and after the step
        return F.cross_entropy(model(x), y)
    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad(): after = loss()
    assert after < before


# ---- torchvision models ----------------------------------------------------------------------------

def test_torchvision_model_takes_in_ch_and_n_out():
    model = torchvision_model('resnet18', n_out=5, in_ch=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 5
    with torch.no_grad(): assert model.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    gnet = torchvision_model('googlenet', n_out=4).train()  # no auxiliary outputs in training mode
    assert gnet(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_torchvision_model_loads_local_weights_except_the_head(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18, squeezenet1_1
    torch.manual_seed(0)
    pretrained = resnet18().state_dict()
    torch.save(pretrained, tmp_path / 'resnet18.pt')
    model = torchvision_model('resnet18', n_out=5, in_ch=3, weights=tmp_path / 'resnet18.pt')
    loaded = model.state_dict()
    for k, v in pretrained.items():
        if not k.startswith('fc.'): torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    assert model.fc.weight.shape == (5, 512)
    grey = torchvision_model('resnet18', n_out=5, in_ch=1, weights=str(tmp_path / 'resnet18.pt'))
    torch.testing.assert_close(grey.conv1.weight, pretrained['conv1.weight'].sum(1, keepdim=True))
    # a head that is a conv (SqueezeNet), from a .safetensors file
    squeeze = squeezenet1_1().state_dict()
    save_file(squeeze, str(tmp_path / 'squeezenet.safetensors'))
    model = torchvision_model('squeezenet1_1', n_out=3, weights=tmp_path / 'squeezenet.safetensors')
    torch.testing.assert_close(model.features[0].weight, squeeze['features.0.weight'])
    assert model.classifier[1].weight.shape == (3, 512, 1, 1)


def test_torchvision_model_never_downloads_and_says_why(tmp_path):
    from torchvision.models import ResNet18_Weights, resnet34
    for weights in ['IMAGENET1K_V1', ResNet18_Weights.IMAGENET1K_V1, tmp_path / 'missing.pt']:
        with pytest.raises(ValueError, match='local file.*never downloads'):
            torchvision_model('resnet18', weights=weights)
    with pytest.raises(ValueError, match="did you mean resnet18"): torchvision_model('resnet19')
    torch.save(resnet34().state_dict(), tmp_path / 'resnet34.pt')
    with pytest.raises(RuntimeError, match="does not fit torchvision's resnet18"):
        torchvision_model('resnet18', weights=tmp_path / 'resnet34.pt')
    torch.save(nn.Linear(2, 2), tmp_path / 'pickled.pt')
    with pytest.raises(ValueError, match='not a weights-only state_dict'):
        torchvision_model('resnet18', weights=tmp_path / 'pickled.pt')


# ---- registry --------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,kwargs', [(n, {}) for n in sorted(MODELS) if n not in ('torchvision_model', 'vision_model')]
                         + [('vgg', {'arch': ((1, 8), (2, 16)), 'fc': 32}), ('simple_cnn', {'bn': True}),
                            ('torchvision_model', {'name': 'mobilenet_v3_small', 'n_out': 4}),
                            ('vision_model', {'arch': 'mobilenet_v3_small', 'n_out': 4, 'n_in': 1}),
                            ('vision_model', {'arch': {'name': 'mobilenet', 'kwargs': {'width_mult': 0.25}}, 'n_out': 4,
                                              'n_in': 1})])
def test_a_model_rebuilds_from_its_json_spec(name, kwargs):
    model = get_model(name, **kwargs).eval()
    spec = json.loads(json.dumps(model.learnkit_spec))
    assert spec == model.learnkit_spec and spec['name'] == name
    rebuilt = get_model(spec['name'], **spec['kwargs']).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, spec['kwargs'].get('in_ch', 1), 64, 64)
    with torch.no_grad(): torch.testing.assert_close(rebuilt(x), model(x))


def test_spec_records_every_argument_with_defaults_applied(tmp_path):
    assert simple_cnn(bn=True).learnkit_spec == {'name': 'simple_cnn', 'kwargs': {'bn': True, 'n_out': 10, 'in_ch': 1}}
    torch.save(torchvision_model('resnet18').state_dict(), tmp_path / 'w.pt')
    spec = torchvision_model('resnet18', n_out=10, weights=tmp_path / 'w.pt').learnkit_spec
    assert spec['kwargs'] == {'name': 'resnet18', 'n_out': 10, 'in_ch': 3, 'weights': None}  # weights travel in the state_dict


def test_registry_errors_name_the_fix():
    with pytest.raises(ValueError, match='no model named .*known models: .*resnet18'): get_model('resnet_18')
    with pytest.raises(TypeError, match='simple_cnn.*unexpected keyword'): get_model('simple_cnn', depth=3)

    def tiny_net(n_out=10, in_ch=1, act=None): return nn.Sequential(nn.Conv2d(in_ch, n_out, 1), (act or nn.ReLU)())
    try:
        build = register_model(tiny_net)
        assert MODELS['tiny_net'] is build
        assert get_model('tiny_net', n_out=3).learnkit_spec == {'name': 'tiny_net', 'kwargs': {'n_out': 3, 'in_ch': 1, 'act': None}}
        with pytest.raises(TypeError, match=r'tiny_net\(act=...\).*no JSON form'): build(act=nn.ReLU)
        def other(): return nn.Linear(1, 1)
        other.__name__ = other.__qualname__ = 'simple_cnn'
        with pytest.raises(ValueError, match="'simple_cnn' is taken"): register_model(other)
    finally: MODELS.pop('tiny_net', None)
