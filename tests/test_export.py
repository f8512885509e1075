"""Exports that predict on any image: a learner trained on a folder of PNGs of mixed sizes, with Resize and a
crop as item transforms and Normalize as batch transform, is exported, loaded back, and asked about photos of
other sizes and modes, as a user does with a new photo. The loaded learner must give exactly what the original
gives, and the file must hold names and arguments only, never pickled code."""
import pytest
import torch
from PIL import Image
from torch import nn

from learnkit import Learner, load_learner
from learnkit.data import (TRANSFORMS, CategoryBlock, CenterCrop, DataBlock, Flip, GrandparentSplitter, ImageBlock,
                           ItemTransform, Normalize, PILImage, PILImageBW, RandomCrop, RandomResizedCrop, Resize,
                           get_image_files, parent_label, register_transform)
from learnkit.models import simple_cnn

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning:torchvision')

SIZES = [(28, 28), (36, 30), (24, 40)]             # (w, h) of the training files: item transforms make them one size
PHOTO_SIZES = [(20, 33), (64, 64), (100, 50)]      # (w, h) of the photos asked about after loading
MODES = ['L', 'RGB', 'RGBA', 'P']
# Two learners as users build them: colour with Resize + CenterCrop and a validation-time RandomCrop; grayscale
# with RandomResizedCrop (whose validation form, a Resize, is what gets exported). Flip acts in training only.
SETUPS = {
    'rgb-resize-crop': dict(cls=PILImage, item_tfms=[Resize(32, method='squish'), CenterCrop(28)],
                            batch_tfms=[Normalize(), RandomCrop(24, padding=2), Flip()]),
    'bw-random-resized-crop': dict(cls=PILImageBW, item_tfms=[RandomResizedCrop(28, min_scale=0.5)],
                                   batch_tfms=[Normalize(), Flip()]),
}


def photo(img, size, mode):
    "A Fashion-MNIST image as a PIL photo of `size` (w, h) in `mode`; RGBA gets a varying alpha, RGB a tint."
    im = Image.fromarray(img.numpy()).resize(size, Image.BILINEAR).convert('RGB')
    r, g, b = im.split()
    im = Image.merge('RGB', (r, g.point(lambda v: v // 2), b))
    if mode == 'RGBA': im.putalpha(Image.linear_gradient('L').resize(size))
    return im.convert(mode) if mode != 'RGBA' else im


@pytest.fixture(scope='module')
def tree(tmp_path_factory, fmnist):
    "train/ and valid/ folders of colour PNGs of three sizes, 10 classes: 60 training and 20 validation images."
    root = tmp_path_factory.mktemp('photos')
    for split, xs, ys in (('train', fmnist.x_train[:60], fmnist.y_train[:60]),
                          ('valid', fmnist.x_valid[:20], fmnist.y_valid[:20])):
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = root / split / f'class{int(y)}'
            folder.mkdir(parents=True, exist_ok=True)
            photo(x, SIZES[i % 3], 'RGB').save(folder / f'{i}.png')
    return root


def build(tree, cls, item_tfms, batch_tfms, path):
    torch.manual_seed(0)
    dls = DataBlock(blocks=(ImageBlock(cls), CategoryBlock), get_items=get_image_files, get_y=parent_label,
                    splitter=GrandparentSplitter('train', 'valid'), item_tfms=item_tfms,
                    batch_tfms=batch_tfms).dataloaders(tree, bs=16, seed=0, device='cpu', num_workers=0)
    return Learner(dls, simple_cnn(bn=True, in_ch=len(cls.mode), n_out=dls.c), loss_func=nn.CrossEntropyLoss(),
                   path=path)


@pytest.fixture(scope='module', params=list(SETUPS))
def trained(request, tree, tmp_path_factory):
    "A learner fitted for one epoch on the tree, with one of the SETUPS."
    learn = build(tree, **SETUPS[request.param], path=tmp_path_factory.mktemp('learner'))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    return learn


@pytest.fixture(scope='module')
def photos(tmp_path_factory, fmnist):
    "Photo files of every PHOTO_SIZE and MODE, and the same photos as PIL images."
    folder = tmp_path_factory.mktemp('new-photos')
    out = []
    for i, size in enumerate(PHOTO_SIZES):
        for mode in MODES:
            im = photo(fmnist.x_valid[100 + i], size, mode)
            im.save(folder / f'{mode}-{size[0]}x{size[1]}.png')
            out.append((folder / f'{mode}-{size[0]}x{size[1]}.png', im))
    return out


def test_loaded_export_predicts_any_size_and_mode_as_the_original(trained, photos):
    file = trained.export()
    loaded = load_learner(file)
    for path, im in photos:
        for item in (path, im):
            label, idx, probs = loaded.predict(item)
            expected = trained.predict(item)
            assert torch.equal(probs, expected[2]) and (label, idx) == expected[:2], (path.name, type(item).__name__)
            assert probs.shape == (10,)
    # a tensor of any size, with the model's channels, too
    channels = len(loaded.dls.pipeline.mode)
    x = torch.randint(0, 256, (channels, 50, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.predict(x)[2], trained.predict(x)[2])
    with pytest.raises(ValueError, match=f'4 channels.*{loaded.dls.pipeline.mode} images.*PIL image'):
        loaded.predict(torch.zeros(4, 30, 30, dtype=torch.uint8))
    # and a validation file gives what the validation loader feeds the model
    xb, _ = trained.dls.valid.one_batch()
    with torch.no_grad(): direct = torch.softmax(trained.model.eval()(xb[:1]), 1)[0]
    assert torch.allclose(loaded.predict(trained.dls.valid.items[0])[2], direct, atol=1e-6)


def test_export_holds_transforms_as_names_and_plain_arguments(trained):
    raw = torch.load(trained.export(), weights_only=True)  # no pickled objects: torch's safe loader reads it

    def plain(o):
        if isinstance(o, dict): return all(isinstance(k, str) and plain(v) for k, v in o.items())
        if isinstance(o, list): return all(map(plain, o))
        return o is None or isinstance(o, (bool, int, float, str))
    assert plain(raw['pipeline'])
    spec = raw['pipeline']
    norm = trained.dls.train.batch_tfms[-1]
    assert spec['batch_tfms'][-1] == {'name': 'Normalize', 'args': {'mean': norm.mean.tolist(), 'std': norm.std.tolist()}}
    if spec['mode'] == 'RGB':
        assert spec['item_tfms'] == [{'name': 'Resize', 'args': {'size': [32, 32], 'method': 'squish'}},
                                     {'name': 'CenterCrop', 'args': {'size': [28, 28]}}]
        assert spec['batch_tfms'][0] == {'name': 'RandomCrop', 'args': {'size': [24, 24], 'padding': 2}}
    else:  # RandomResizedCrop is exported as what it does in validation; Flip (training only) not at all
        assert spec['mode'] == 'L' and len(spec['batch_tfms']) == 1
        assert spec['item_tfms'] == [{'name': 'Resize', 'args': {'size': [28, 28], 'method': 'crop'}}]


class Invert(ItemTransform):
    "A user's own item transform, not registered."
    def prepare(self, img): return 255 - img


class Apply(ItemTransform):
    "A user's transform holding a function, which no export can name."
    def __init__(self, fn): self.fn = fn
    def prepare(self, img): return self.fn(img)


def test_unexportable_transforms_are_named_with_the_fix(tree, tmp_path, photos):
    learn = build(tree, PILImageBW, [Resize(28), Invert()], [Normalize()], tmp_path)
    with pytest.raises(TypeError, match=r'Invert\(.*cannot be exported.*register_transform.*with_tfms=False'
                                        r'.*load_learner\(path, item_tfms='):
        learn.export()
    assert not (tmp_path / 'export.pth').exists()
    photo_file = photos[-1][0]
    # fix 1: export without transforms and pass them again when loading
    loaded = load_learner(learn.export(with_tfms=False), item_tfms=[Resize(28), Invert()])
    assert torch.equal(loaded.predict(photo_file)[2], learn.predict(photo_file)[2])
    # fix 2: register the class; a process that has not imported it is told so when loading
    try:
        register_transform(Invert)
        file = learn.export()
        assert torch.equal(load_learner(file).predict(photo_file)[2], learn.predict(photo_file)[2])
    finally: TRANSFORMS.pop('Invert')
    with pytest.raises(ValueError, match="names the transform 'Invert', which is not registered.*Import the module"):
        load_learner(file)
    # a registered transform whose arguments are not plain values is named, with the argument
    try:
        register_transform(Apply)
        with pytest.raises(TypeError, match=r'argument fn=<function .* is a function.*Apply.to_spec\(\)'):
            Apply(lambda x: x).to_spec()
    finally: TRANSFORMS.pop('Apply')


@pytest.mark.parametrize('trained', ['bw-random-resized-crop'], indirect=True)
def test_old_exports_without_transforms_still_load(trained, tmp_path, photos):
    raw = torch.load(trained.export(), weights_only=True)
    del raw['pipeline']
    raw['version'] = 1                                  # as learnkit wrote exports before transforms were exported
    torch.save(raw, tmp_path / 'old.pth')
    old = load_learner(tmp_path / 'old.pth')
    pipeline = old.dls.pipeline                         # the old behaviour: the Normalize, and its channels' mode
    assert pipeline.mode == 'L' and pipeline.item_tfms == () and [type(t) for t in pipeline.batch_tfms] == [Normalize]
    x = trained.dls.valid.dataset[0][0]                 # an image of the training size predicts as the original
    assert torch.equal(old.predict(x)[2], trained.predict(x)[2])
    # passing the item transforms again makes it predict any photo
    again = load_learner(tmp_path / 'old.pth', item_tfms=[Resize(28)])
    assert torch.equal(again.predict(photos[0][0])[2], trained.predict(photos[0][0])[2])
