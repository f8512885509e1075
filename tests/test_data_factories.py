"""Data the way users have it: `ImageDataLoaders.from_*` over small trees and CSVs of real Fashion-MNIST images
written in tmp folders (PNG and JPEG, gray and colour), multi-label and attribute-column targets, a short fit of
each kind, `show_results`, `tta`, and an error that names the fault for each bad input."""
import operator
import re
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torchvision.io import encode_jpeg, encode_png

from learnkit import Learner, accuracy, accuracy_multi
from learnkit.data import (CategoryBlock, ColReader, ColSplitter, DataBlock, Flip, ImageBlock, ImageDataLoaders,
                           MultiCategoryBlock, Normalize, PILImageBW, parent_label)

CPU = dict(device='cpu')
# torchvision 0.29 deprecates its image codecs (for torchcodec); the tests write images with them.
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning:torchvision')

CLASSES = {1: 'trouser', 7: 'sneaker', 8: 'bag'}  # three Fashion-MNIST classes, 12 images each
TAG = {'trouser': 'clothing', 'sneaker': 'footwear', 'bag': 'accessory'}


def image(img, i):
    "A Fashion-MNIST image as it might be on disk: gray, or (every third one) tinted colour."
    if i % 3: return img[None]
    return (img[None].float() * torch.tensor([1.0, 0.6, 0.3])[:, None, None]).to(torch.uint8)


def write(fn, img):
    fn.parent.mkdir(parents=True, exist_ok=True)
    fn.write_bytes((encode_png(img) if fn.suffix == '.png' else encode_jpeg(img, quality=95)).numpy().tobytes())
    return fn


@pytest.fixture(scope='module')
def data(tmp_path_factory, fmnist):
    """36 images in `images/` named `<label>_<i>.<png|jpg>`, the same as a `train/valid/<label>/` tree, and a
    table of them: label, a -1/1 `Smiling` attribute (trousers smile), 0/1 `Eyeglasses`, space-separated
    `tags` (the kind, plus 'bright' for the brighter half) and `is_valid` (every fourth)."""
    root = tmp_path_factory.mktemp('factories')
    idx = [i for c in CLASSES for i in (fmnist.y_train == c).nonzero().flatten()[:12].tolist()]
    bright = fmnist.x_train[idx].float().mean((1, 2))
    rows = []
    for n, i in enumerate(idx):
        label, ext = CLASSES[int(fmnist.y_train[i])], ('.png', '.jpg')[n % 2]
        img = image(fmnist.x_train[i], n)
        name = f'{label}_{n}{ext}'
        write(root / 'images' / name, img)
        write(root / 'tree' / ('valid' if n % 4 == 0 else 'train') / label / name, img)
        tags = TAG[label] + (' bright' if bright[n] > bright.median() else '')
        rows.append(dict(image_id=name, label=label, Smiling=1 if label == 'trouser' else -1,
                         Eyeglasses=int(label == 'bag'), tags=tags, is_valid=n % 4 == 0))
    df = pd.DataFrame(rows)
    df.to_csv(root / 'labels.csv', index=False)
    return root, df


def tiny_model(c_in, n_out):
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n_out))


def fit_briefly(dls, **kwargs):
    "A short fit, as a user's first try: losses and metrics must come out as finite numbers."
    torch.manual_seed(0)
    learn = Learner(dls, tiny_model(dls.one_batch()[0].shape[1], dls.c), **kwargs)
    with learn.no_logging(), learn.no_bar(): learn.fit(2, 1e-2)
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1])).all()  # train loss, valid loss, metrics
    return learn


def labels_of(dl, vocab):
    "{file name: label} for every item of a loader, read from its targets."
    return {Path(f).name: vocab[int(y)] for f, y in zip(dl.items, dl.source.labels)}


# ------------------------------------------------------------------------------------------ folders and names
def test_from_folder_train_valid_tree_and_valid_pct(data):
    root, df = data
    dls = ImageDataLoaders.from_folder(root / 'tree', bs=8, seed=0, **CPU)
    assert dls.vocab == ['bag', 'sneaker', 'trouser'] and (dls.train.n, dls.valid.n) == (27, 9)
    assert all(name.startswith(label) for name, label in labels_of(dls.valid, dls.vocab).items())
    xb, yb = dls.valid.one_batch()  # gray and colour, PNG and JPEG files all decode to RGB by default
    assert xb.shape == (8, 3, 28, 28) and yb.dtype == torch.int64
    gray = ImageDataLoaders.from_folder(root / 'tree', img_cls=PILImageBW, vocab=['trouser', 'bag', 'sneaker'],
                                        bs=8, **CPU)
    assert gray.valid.one_batch()[0].shape == (8, 1, 28, 28) and gray.vocab == ['trouser', 'bag', 'sneaker']
    # valid_pct: every image under the folder, a reproducible random fifth held out
    split = lambda seed: ImageDataLoaders.from_folder(root / 'tree', valid_pct=0.25, seed=seed, bs=8, **CPU).valid.items
    assert len(split(1)) == 9 and split(1) == split(1) and split(1) != split(2)


def test_from_name_func_name_re_path_func_and_lists_label_alike(data):
    root, df = data
    fnames = sorted((root / 'images').iterdir())
    by_func = ImageDataLoaders.from_name_func(root, fnames, lambda name: name.split('_')[0], seed=3, bs=8, **CPU)
    by_re = ImageDataLoaders.from_name_re(root, fnames, r'^([a-z]+)_\d+', seed=3, bs=8, **CPU)
    by_path = ImageDataLoaders.from_path_func(root, fnames, lambda p: p.name.split('_')[0], seed=3, bs=8, **CPU)
    # from_lists with names relative to the path, as a CSV would give them
    by_lists = ImageDataLoaders.from_lists(root / 'images', df.image_id, df.label, seed=3, bs=8, **CPU)
    truth = dict(zip(df.image_id, df.label))
    for dls in (by_func, by_re, by_path, by_lists):
        assert dls.vocab == ['bag', 'sneaker', 'trouser'] and (dls.train.n, dls.valid.n) == (29, 7)
        assert labels_of(dls.train, dls.vocab) == {n: truth[n] for n in labels_of(dls.train, dls.vocab)}
    assert by_func.valid.items == by_re.valid.items  # one seed, one split


# --------------------------------------------------------------------------------------------------- tables
def test_from_csv_single_label_with_valid_col_fits(data):
    root, df = data
    dls = ImageDataLoaders.from_csv(root, 'labels.csv', folder='images', fn_col='image_id', label_col='label',
                                    valid_col='is_valid', bs=8, **CPU)
    assert dls.vocab == ['bag', 'sneaker', 'trouser'] and (dls.train.n, dls.valid.n) == (27, 9)
    assert {Path(f).name for f in dls.valid.items} == set(df.image_id[df.is_valid])
    assert labels_of(dls.valid, dls.vocab) == dict(zip(df.image_id[df.is_valid], df.label[df.is_valid]))
    learn = fit_briefly(dls, metrics=accuracy)
    assert isinstance(learn.loss_func, nn.CrossEntropyLoss)
    label, idx, probs = learn.predict(root / 'images' / df.image_id[0])  # single-label predict, as before
    assert label == dls.vocab[idx] and probs.shape == (3,) and abs(float(probs.sum()) - 1) < 1e-5


@pytest.mark.parametrize('values', [(-1, 1), (0, 1)])
def test_binary_attribute_column_is_a_two_class_target(data, values):
    "The chapters' smile classifier: one column of a CelebA-style attribute table, -1/1 or 0/1."
    root, df = data
    attrs = df[['image_id', 'Smiling']].assign(Smiling=df.Smiling.map({-1: values[0], 1: values[1]}))
    dls = ImageDataLoaders.from_df(attrs, root, folder='images', label_col='Smiling', valid_pct=0.25, seed=0,
                                   bs=8, **CPU)
    assert dls.vocab == list(values) and dls.c == 2
    smiling = dict(zip(attrs.image_id, attrs.Smiling))
    assert labels_of(dls.train, dls.vocab) == {n: smiling[n] for n in labels_of(dls.train, dls.vocab)}
    learn = fit_briefly(dls, metrics=accuracy)
    assert learn.predict(root / 'images' / 'trouser_0.png')[0] in values


def test_multi_label_from_delimited_column_fits_and_decodes_by_threshold(data):
    root, df = data
    dls = ImageDataLoaders.from_df(df, root, folder='images', fn_col='image_id', label_col='tags', label_delim=' ',
                                   valid_col='is_valid', bs=8, **CPU)
    assert dls.vocab == ['accessory', 'bright', 'clothing', 'footwear']
    xb, yb = dls.valid.one_batch()
    assert yb.dtype == torch.float32 and yb.shape == (8, 4)
    tags = dict(zip(df.image_id, df.tags))
    for f, row in zip(dls.valid.items, yb.tolist()):
        assert sorted(tags[Path(f).name].split()) == [dls.vocab[j] for j, v in enumerate(row) if v == 1]
    assert ';' in ''.join(t.get_title() for t in dls.show_batch(max_n=8).axes)  # several labels, joined

    learn = fit_briefly(dls, metrics=partial(accuracy_multi, thresh=0.5))
    assert type(learn.loss_func) is nn.BCEWithLogitsLoss  # chosen by the data
    assert learn.recorder.metric_names[-2] == 'accuracy_multi' and 0 <= learn.recorder.values[-1][2] <= 1
    probs, targs, decoded = learn.get_preds(with_decoded=True)
    assert probs.shape == targs.shape == decoded.shape == (9, 4) and decoded.dtype == torch.bool
    assert torch.equal(decoded, probs > 0.5) and 0 <= probs.min() and probs.max() <= 1
    assert torch.equal(learn.get_preds(with_decoded=True, thresh=0.3)[2], probs > 0.3)
    labels, hot, p = learn.predict(dls.valid.items[0])
    assert torch.allclose(p, probs[0], atol=1e-5) and torch.equal(hot, p > 0.5)
    assert labels == [v for v, h in zip(dls.vocab, hot.tolist()) if h]
    assert learn.predict(dls.valid.items[0], thresh=1e-6)[0] == dls.vocab  # every class above a tiny threshold
    with pytest.raises(ValueError, match='with_decoded=True'): learn.get_preds(thresh=0.3)


def test_one_hot_columns_are_encoded_multi_label(data):
    root, df = data
    onehot = df[['image_id', 'Eyeglasses']].assign(Hat=(df.label == 'trouser').astype(int), is_valid=df.is_valid)
    dls = ImageDataLoaders.from_df(onehot, root, folder='images', label_col=['Eyeglasses', 'Hat'],
                                   valid_col='is_valid', bs=8, **CPU)
    assert dls.vocab == ['Eyeglasses', 'Hat'] and isinstance(dls.loss_func, nn.BCEWithLogitsLoss)
    expect = torch.tensor(onehot[onehot.is_valid][['Eyeglasses', 'Hat']].values, dtype=torch.float32)
    assert torch.equal(dls.valid.source.labels, expect)
    # -1/1 attribute columns are refused as encoded labels, saying how to map them
    with pytest.raises(ValueError, match=r'values other than 0/1.*replace|map -1 to 0'):
        DataBlock(blocks=(ImageBlock, MultiCategoryBlock(encoded=True, vocab=['Smiling'])),
                  get_x=ColReader('image_id', pref=root / 'images'), get_y=ColReader(['Smiling']),
                  ).dataloaders(df, **CPU)


def test_single_label_learner_refuses_a_threshold(data):
    root, df = data
    dls = ImageDataLoaders.from_df(df, root, folder='images', fn_col='image_id', label_col='label', bs=8, **CPU)
    learn = Learner(dls, tiny_model(3, 3))
    with pytest.raises(ValueError, match='most probable class'):
        learn.predict(root / 'images' / df.image_id[30], thresh=.3)
    preds, targs, decoded = learn.get_preds(with_decoded=True)
    assert torch.equal(decoded, preds.argmax(1)) and targs.dtype == torch.int64


# ----------------------------------------------------------------------------------- predictions: tta, show
@pytest.fixture(scope='module')
def trained(data):
    root, df = data
    dls = ImageDataLoaders.from_csv(root, folder='images', fn_col='image_id', label_col='label',
                                    valid_col='is_valid', batch_tfms=Normalize(), bs=8, **CPU)
    return fit_briefly(dls)


def test_get_preds_on_the_training_set_covers_every_item_in_order(trained):
    preds, targs = trained.get_preds(ds_idx=0)
    assert len(preds) == trained.dls.train.n == 27  # not 24: no batch dropped, and in the dataset's order
    assert torch.equal(targs, trained.dls.train.source.labels)
    with pytest.raises(IndexError, match='ds_idx=2'): trained.get_preds(ds_idx=2)


def test_tta_equals_get_preds_without_augmentation_and_blends_with_it(trained):
    preds, targs = trained.get_preds()
    tta_preds, tta_targs = trained.tta(n=2)
    assert tta_preds.shape == preds.shape == (9, 3) and torch.equal(tta_targs, targs)
    assert torch.allclose(tta_preds, preds, atol=1e-6)  # nothing to augment: the plain predictions
    flipping = trained.dls.valid.new(augment=False)
    flipping.batch_tfms = [Flip(p=1.0)] + flipping.batch_tfms  # every image flipped in the augmented passes
    (aug, plain), _ = trained.tta(dl=flipping, n=2, beta=None)
    assert torch.allclose(plain, preds, atol=1e-6) and not torch.allclose(aug, preds, atol=1e-4)
    assert torch.allclose(trained.tta(dl=flipping, n=2)[0], 0.75 * aug + 0.25 * plain, atol=1e-6)
    assert torch.allclose(trained.tta(dl=flipping, n=1, use_max=True)[0], torch.maximum(aug, plain), atol=1e-6)


def test_show_results_titles_target_over_prediction(trained):
    fig = trained.show_results(max_n=4)
    assert len(fig.axes) == 4
    vocab = trained.dls.vocab
    for ax in fig.axes:
        target, pred = ax.get_title().split('\n')
        assert target in vocab and pred in vocab
        assert ax.title.get_color() == ('green' if target == pred else 'red')


# ------------------------------------------------------------------------------------------------ bad input
def test_each_bad_input_is_named(data, tmp_path):
    root, df = data
    from_df = partial(ImageDataLoaders.from_df, path=root, folder='images', **CPU)
    with pytest.raises(ValueError, match=re.escape("no column 'Smile' in the table; its columns are ['image_id'")):
        from_df(df, fn_col='image_id', label_col='Smile')
    gone = df.assign(image_id=df.image_id.where(df.index % 10 != 3, 'lost.png'))  # 4 rows name a missing file
    with pytest.raises(FileNotFoundError, match=r'4 of the 36 image files are missing.*lost\.png'):
        from_df(gone, fn_col='image_id', label_col='label')
    holes = df.assign(label=df.label.where(~df.index.isin([5, 17])))
    with pytest.raises(ValueError, match=r"column 'label' has 2 missing value.*rows \[5, 17\]"):
        from_df(holes, fn_col='image_id', label_col='label')
    with pytest.raises(ValueError, match=r"must be boolean-like.*'maybe'.*rows \[2\]"):
        from_df(df.assign(is_valid=df.is_valid.where(df.index != 2, 'maybe')), fn_col='image_id',
                label_col='label', valid_col='is_valid')
    with pytest.raises(FileNotFoundError, match=r"no file .*attrs\.csv; CSV files there: \['labels\.csv'\]"):
        ImageDataLoaders.from_csv(root, 'attrs.csv')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match=r'the folder .*empty is empty'):
        ImageDataLoaders.from_folder(tmp_path / 'empty', valid_pct=0.2)
    with pytest.raises(FileNotFoundError, match=r"no folder 'train'.*the folder is empty"):
        ImageDataLoaders.from_folder(tmp_path / 'empty')
    with pytest.raises(ValueError, match=r"3 file names but 2 labels"):
        ImageDataLoaders.from_lists(root, ['a.png', 'b.png', 'c.png'], ['x', 'y'])
    with pytest.raises(TypeError, match=r"not a list of labels; split such cells into labels with label_delim"):
        DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_x=ColReader('image_id', pref=root / 'images'),
                  get_y=ColReader('tags')).dataloaders(df, **CPU)
    with pytest.raises(TypeError, match=r"several labels; a CategoryBlock takes one label per item"):
        from_df(df, fn_col='image_id', label_col='tags', label_delim=' ', y_block=CategoryBlock)
    with pytest.raises(ValueError, match=r"ColSplitter\('label'\): column 'label' must be boolean-like"):
        DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=ColReader('image_id', pref=root / 'images'),
                  get_y=ColReader('label'), splitter=ColSplitter('label')).dataloaders(df, **CPU)


def test_col_reader_reads_rows_and_whole_columns_alike(data):
    "A get_y that is a plain function gets each row as a pandas Series, as in fastai; ColReader reads columns."
    root, df = data
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=ColReader(0, pref=root / 'images'),
                      get_y=lambda row: row['label'].upper(), splitter=ColSplitter())
    dls = block.dataloaders(df, bs=8, **CPU)
    assert dls.vocab == ['BAG', 'SNEAKER', 'TROUSER'] and dls.valid.n == 9
    row = df.iloc[4]
    reader = ColReader('tags', label_delim=' ')
    assert reader(row) == reader.read_column(df)[4] == row.tags.split()
    assert ColReader(['label', 'Smiling'])(row) == ColReader(['label', 'Smiling']).read_column(df)[4]
    assert operator.eq(*[ColReader('image_id', suff='.x')(r) for r in (row, next(df.iloc[4:5].itertuples()))])
