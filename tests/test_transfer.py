"""Transfer learning as a fastai user does it: vision_learner on pretrained weights, freeze, fine_tune, export.

The "pretrained" weights are made here: the chapter's CNN trained on Fashion-MNIST's first five classes, then
fine-tuned on the other five. torchvision's resnet18 is only built (from random weights saved to a file), never
trained: its structure, its 3-channel stem on grey images and torch's hub cache are what is checked with it.
"""
import functools

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from learnkit import Callback, accuracy, load_learner, vision_learner
from learnkit.data import DataLoaders, Normalize
from learnkit.models import IMAGENET_STATS, AdaptiveConcatPool2d, mobilenet, simple_cnn

from conftest import torch_dls

FIRST, SECOND = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]   # clothes, then shoes, shirts and bags
GREY_STATS = ([sum(IMAGENET_STATS[0]) / 3], [sum(IMAGENET_STATS[1]) / 3])
small_cnn = functools.partial(simple_cnn, bn=True)   # a learnkit model; cut=4 keeps its four conv blocks
CUT = 4


def task_dls(fm, classes, n_train, n_valid=500, channels=1, bs=32, seed=0, batch_tfms=None):
    "Loaders over the first images of `classes` (relabelled 0..), grey or copied to 3 channels."
    def pick(x, y, n):
        keep = (y[:, None] == torch.tensor(classes)).any(1)
        x, y = x[keep][:n], y[keep][:n] - classes[0]
        return (x[:, None].expand(-1, 3, -1, -1).contiguous() if channels == 3 else x), y
    (x, y), (xv, yv) = pick(fm.x_train, fm.y_train, n_train), pick(fm.x_valid, fm.y_valid, n_valid)
    return DataLoaders.from_tensors(x, y, xv, yv, bs=bs, seed=seed, batch_tfms=batch_tfms,
                                    vocab=[fm.classes[c] for c in classes])


@pytest.fixture(scope='module')
def pretrained_file(fmnist, tmp_path_factory):
    "The chapter's CNN with BN trained on the first five classes, normalised as vision_learner will: its state_dict."
    torch.manual_seed(0)
    dls = task_dls(fmnist, FIRST, 1000, 300, bs=64, batch_tfms=[Normalize.from_stats(*GREY_STATS)])
    from learnkit import Learner
    learn = Learner(dls, small_cnn(n_out=5), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    assert learn.validate()[1] > 0.7
    path = tmp_path_factory.mktemp('weights') / 'small_cnn.pth'
    torch.save(learn.model.state_dict(), path)
    return path


@pytest.fixture
def resnet18_file(tmp_path):
    "A torchvision resnet18 state_dict (random weights: only its shapes and values matter here)."
    torch.manual_seed(0)
    path = tmp_path / 'resnet18.pth'
    torch.save(resnet18().state_dict(), path)
    return path


def params_by_kind(model):
    "Copies of the body's normalisation parameters, the body's other parameters, and the head's."
    norms = {id(p) for m in model[0].modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    body = [(id(p) in norms, p.detach().cpu().clone()) for p in model[0].parameters()]
    return ([p for is_norm, p in body if is_norm], [p for is_norm, p in body if not is_norm],
            [p.detach().cpu().clone() for p in model[1].parameters()])


def same(before, after): return all(torch.equal(a, b) for a, b in zip(before, after))
def all_changed(before, after): return not any(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize('train_bn', [True, False])
def test_frozen_body_does_not_change_but_its_batchnorm_trains(fmnist, pretrained_file, train_bn):
    dls = task_dls(fmnist, SECOND, 200)
    learn = vision_learner(dls, small_cnn, weights=pretrained_file, cut=CUT, train_bn=train_bn, metrics=accuracy)
    norms, others, head = params_by_kind(learn.model)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)   # frozen, with Adam's weight decay 0.01
    norms_after, others_after, head_after = params_by_kind(learn.model)
    assert same(others, others_after)
    assert all_changed(norms, norms_after) if train_bn else same(norms, norms_after)
    assert all_changed(head, head_after)

    learn.unfreeze()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
    assert all_changed(others_after, params_by_kind(learn.model)[1])


class LRLog(Callback):
    "Each training batch's learning rates of the body's and the head's torch parameter groups, one list per fit."
    order, run_valid = 70, False   # after ParamScheduler has set them

    def __init__(self): self.fits = []

    def before_fit(self):
        self.body = {id(p) for p in self.learn.model[0].parameters()}
        self.fits.append([])

    def before_batch(self):
        groups = self.learn.opt.param_groups
        self.fits[-1].append(({g['lr'] for g in groups if id(g['params'][0]) in self.body},
                              {g['lr'] for g in groups if id(g['params'][0]) not in self.body}))


def test_fine_tune_trains_each_group_at_its_own_rate(fmnist, pretrained_file):
    dls = task_dls(fmnist, SECOND, 200)
    learn = vision_learner(dls, small_cnn, weights=pretrained_file, cut=CUT)
    log, base_lr, lr_mult = LRLog(), 1e-2, 100
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, base_lr, lr_mult=lr_mult, cbs=log)
    frozen, unfrozen = log.fits
    for batches, ratio in ((frozen, 10), (unfrozen, lr_mult)):   # slice(base_lr), then slice(lr / lr_mult, lr)
        for body, head in batches:
            assert len(body) == len(head) == 1
            assert max(head) / max(body) == pytest.approx(ratio)
    # 1cycle starts at lr_max / div: fit_one_cycle's div 25 while frozen, fine_tune's div 5 with base_lr halved after.
    assert max(frozen[0][1]) == pytest.approx(base_lr / 25)
    assert max(unfrozen[0][1]) == pytest.approx(base_lr / 2 / 5)


def test_fine_tuning_pretrained_weights_beats_training_from_scratch(fmnist, pretrained_file):
    def accuracy_after(pretrained):
        torch.manual_seed(0)
        dls = task_dls(fmnist, SECOND, 200)
        learn = vision_learner(dls, small_cnn, pretrained=pretrained, weights=pretrained_file if pretrained else None,
                               cut=CUT, metrics=accuracy)
        with learn.no_bar(), learn.no_logging():
            if pretrained: learn.fine_tune(2, 1e-2)
            else: learn.fit_one_cycle(3, 1e-2)   # the same three epochs
        return learn.validate()[1]
    tuned, scratch = accuracy_after(True), accuracy_after(False)
    assert tuned > 0.65 and tuned > scratch + 0.15, (tuned, scratch)


def test_head_is_fastais_and_the_splitter_separates_it_from_the_body(fmnist):
    dls = task_dls(fmnist, SECOND, 64, 64, channels=3)
    learn = vision_learner(dls, resnet18, pretrained=False)
    body, head = learn.model
    assert [type(m).__name__ for m in body] == ['Conv2d', 'BatchNorm2d', 'ReLU', 'MaxPool2d'] + ['Sequential'] * 4
    assert [type(m) for m in head] == [AdaptiveConcatPool2d, nn.Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU,
                                       nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert (head[2].num_features, head[4].out_features, head[8].out_features) == (1024, 512, 5)  # dls.c classes
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.25, 0.5]
    groups = learn.splitter(learn.model)
    assert [len(g) for g in groups] == [len(list(body.parameters())), len(list(head.parameters()))]
    assert learn.opt is None and all(p.requires_grad for p in learn.model.parameters())   # not pretrained: not frozen
    assert not any(isinstance(t, Normalize) for t in dls.train.batch_tfms)                # nor normalised

    head = vision_learner(dls, resnet18, pretrained=False, n_out=3, concat_pool=False, lin_ftrs=[64, 32],
                          ps=[0.1, 0.2, 0.3]).model[1]
    assert [type(m).__name__ for m in head] == ['AdaptiveAvgPool2d', 'Flatten'] + ['BatchNorm1d', 'Dropout', 'Linear',
                                                                                  'ReLU'] * 2 + ['BatchNorm1d', 'Dropout', 'Linear']
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [64, 32, 3]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.1, 0.2, 0.3]
    # A learnkit model is cut before its pooling head, like a torchvision one.
    assert isinstance(vision_learner(dls, mobilenet, pretrained=False).model[0][-1][-1][-1], nn.ReLU)


def test_grey_images_go_through_a_colour_stem_as_fastai_does(fmnist, resnet18_file, tmp_path):
    dls = task_dls(fmnist, SECOND, 64, 64)
    learn = vision_learner(dls, resnet18, weights=resnet18_file, path=tmp_path)
    stem = learn.model[0][0]
    original = resnet18()
    original.load_state_dict(torch.load(resnet18_file, weights_only=True))
    assert stem.in_channels == 1
    torch.testing.assert_close(stem.weight, original.conv1.weight.sum(1, keepdim=True))   # fastai sums the filters
    # So a grey image gives the features the colour network gave for it copied to three channels.
    x = torch.rand(2, 1, 32, 32)
    learn.model.eval(), original.eval()
    features = nn.Sequential(*list(original.children())[:-2])
    torch.testing.assert_close(learn.model[0](x), features(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
    norm = [t for t in dls.valid.batch_tfms if isinstance(t, Normalize)]
    assert len(norm) == 1 and torch.allclose(norm[0].mean, torch.tensor(GREY_STATS[0]))

    # The export rebuilds resnet18 by name: the weights file is not needed to load it.
    item = dls.valid.dataset.host_x[0]
    expected = learn.predict(item)[2]
    learn.export('grey.pth')
    resnet18_file.unlink()
    loaded = load_learner(tmp_path / 'grey.pth')
    torch.testing.assert_close(loaded.predict(item)[2], expected)


def test_export_of_a_fine_tuned_learnkit_model_predicts_the_same(fmnist, pretrained_file, tmp_path):
    dls = task_dls(fmnist, SECOND, 64, 64)
    learn = vision_learner(dls, small_cnn, weights=pretrained_file, cut=CUT, path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, freeze_epochs=0)
    item = dls.valid.dataset.host_x[3]
    learn.export()
    loaded = load_learner(tmp_path / 'export.pth')
    assert loaded.predict(item)[:2] == learn.predict(item)[:2]
    torch.testing.assert_close(loaded.predict(item)[2], learn.predict(item)[2])

    # A cut given as a function cannot be rebuilt by name: load_learner says to pass the model.
    custom = vision_learner(dls, small_cnn, weights=pretrained_file, cut=lambda m: m[:CUT], path=tmp_path)
    custom.export('custom.pth')
    with pytest.raises(ValueError, match='pass model='): load_learner(tmp_path / 'custom.pth')


@pytest.fixture
def no_downloads(monkeypatch, tmp_path):
    "An empty torch hub cache, and any download fails the test."
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    def download(*args, **kwargs): raise AssertionError(f"a download was attempted: {args}")
    import torchvision.models._api
    for module, name in ((torch.hub, 'download_url_to_file'), (torch.hub, 'load_state_dict_from_url'),
                         (torchvision.models._api, 'load_state_dict_from_url')):
        monkeypatch.setattr(module, name, download)
    return tmp_path / 'torch_home' / 'hub' / 'checkpoints'


def test_weights_never_download_and_a_missing_file_says_where_to_put_it(fmnist, no_downloads, resnet18_file):
    dls = task_dls(fmnist, SECOND, 64, 64, channels=3)
    for arch, weights in ((resnet18, None), ('resnet18', 'IMAGENET1K_V1')):   # a torchvision function or name
        with pytest.raises(FileNotFoundError) as e: vision_learner(dls, arch, weights=weights)
        assert 'resnet18-f37072fd.pth' in str(e.value) and str(no_downloads) in str(e.value)
    assert not any(isinstance(t, Normalize) for t in dls.train.batch_tfms)   # a failed call changes nothing
    with pytest.raises(ValueError, match='never downloads'):
        vision_learner(dls, functools.partial(resnet18, weights='DEFAULT'))

    with pytest.raises(FileNotFoundError, match='nowhere.pth'): vision_learner(dls, resnet18, weights='nowhere.pth')
    with pytest.raises(ValueError, match='no published pretrained weights'): vision_learner(dls, small_cnn, cut=CUT)
    with pytest.raises(ValueError, match='pretrained=False but weights'):
        vision_learner(dls, resnet18, pretrained=False, weights=resnet18_file)
    with pytest.raises(ValueError, match='is it a state_dict of this architecture'):
        vision_learner(dls, mobilenet, weights=resnet18_file)

    # The file torchvision would have downloaded, put in the hub cache by hand, is used.
    no_downloads.mkdir(parents=True)
    resnet18_file.rename(no_downloads / 'resnet18-f37072fd.pth')
    learn = vision_learner(dls, resnet18)
    cached = torch.load(no_downloads / 'resnet18-f37072fd.pth', weights_only=True)
    assert torch.equal(learn.model[0][0].weight, cached['conv1.weight'])
    assert not learn.model[0][0].weight.requires_grad and learn.model[0][1].weight.requires_grad  # frozen but BN
    norm = [t for t in dls.train.batch_tfms if isinstance(t, Normalize)]
    assert len(norm) == 1 and torch.allclose(norm[0].mean, torch.tensor(IMAGENET_STATS[0]))


def test_what_vision_learner_cannot_guess_is_asked_for(fmnist, pretrained_file):
    with pytest.raises(ValueError, match='pass n_out='): vision_learner(torch_dls(fmnist, 64, 64), small_cnn, cut=CUT)
    with pytest.raises(ValueError, match='normalize=False'):
        vision_learner(torch_dls(fmnist, 64, 64), small_cnn, n_out=10, weights=pretrained_file, cut=CUT,
                       loss_func=nn.CrossEntropyLoss())
    dls = task_dls(fmnist, SECOND, 64, 64)
    with pytest.raises(ValueError, match='no pooling layer'): vision_learner(dls, small_cnn, pretrained=False)
    learn = vision_learner(dls, small_cnn, pretrained=False, cut=CUT)
    with pytest.raises(ValueError, match='freeze every group'): learn.freeze_to(2)
    from learnkit import Learner
    with pytest.raises(ValueError, match='no splitter'): Learner(dls, small_cnn(n_out=5)).fine_tune(1)


def test_the_health_report_takes_a_frozen_body_for_a_freeze_on_purpose(fmnist):
    from learnkit import WeightStats
    dls = DataLoaders.from_tensors(fmnist.x_train[:256], fmnist.y_train[:256], fmnist.x_valid[:64],
                                   fmnist.y_valid[:64], bs=64, vocab=fmnist.classes, device='cpu')
    learn = vision_learner(dls, simple_cnn, pretrained=False, cut=4, cbs=[WeightStats()], device='cpu')
    learn.freeze()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    frozen = learn.diagnose(show=False).by_check('unchanged_layers')
    assert frozen and all(f.severity == 'info' and 'learn.freeze()' in f.message for f in frozen)
    learn.unfreeze()
    assert not learn.frozen_on_purpose
