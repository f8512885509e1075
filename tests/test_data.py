"""Data loading as a user does it: the chapter's DataBlock over real Fashion-MNIST image trees written in tmp
folders, in-memory tensors, augmentation, resumable and sharded order, and every bad input the issue lists."""
import gzip
import shutil

import pytest
import torch
from fastcore.basics import first
from torchvision.io import decode_image, encode_jpeg, encode_png

from learnkit.data import (Brightness, CategoryBlock, CenterCrop, DataBlock, DataLoaders, Flip, FuncSplitter,
                           GrandparentSplitter, ImageBlock, ImageDecodeError, IndexSplitter, Normalize, PILImage,
                           PILImageBW, RandomCrop, RandomResizedCrop, RandomSplitter, RegexLabeller, Resize, Rotate,
                           aug_transforms, get_image_files, parent_label)
from learnkit.data.images import decode_all
from learnkit.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_PATH, fashion_mnist, fashion_mnist_tree, tree_label

CPU = dict(device='cpu')
# torchvision 0.29 deprecates its image codecs (for torchcodec); the tests write images with them.
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning:torchvision')


def chapter_block(**kwargs):
    "The chapter's DataBlock, as written there (with extra arguments for the test at hand)."
    return DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock), get_items=get_image_files,
                     splitter=GrandparentSplitter('training', 'testing'), get_y=parent_label, **kwargs)


def write_images(root, images, labels, fmt='png'):
    "Write uint8 (C, H, W) images as root/<label>/<i>.<fmt>; return the file paths."
    files = []
    for i, (img, label) in enumerate(zip(images, labels)):
        (root / label).mkdir(parents=True, exist_ok=True)
        data = encode_png(img) if fmt == 'png' else encode_jpeg(img, quality=95)
        files.append(root / label / f'{i}.{fmt}')
        files[-1].write_bytes(data.numpy().tobytes())
    return files


def colour(img, i):
    "A Fashion-MNIST image as RGB, each item tinted differently."
    tint = torch.tensor([1.0, 0.3 + 0.7 * (i % 3) / 2, 0.5])[:, None, None]
    return (img[None].float() * tint).to(torch.uint8)


@pytest.fixture(scope='module')
def png_tree(tmp_path_factory):
    return fashion_mnist_tree(tmp_path_factory.mktemp('fm') / 'png', n_train=300, n_valid=100)


@pytest.fixture
def dls(png_tree):
    return chapter_block(batch_tfms=Normalize()).dataloaders(png_tree, bs=64, seed=0, **CPU)


# ------------------------------------------------------------------------------------------------ datasets
def test_fashion_mnist_reads_gz_and_plain_idx(fmnist, tmp_path):
    x, y, xv, yv, classes = fmnist
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert xv.shape == (10000, 28, 28) and len(classes) == 10 and y.max() == 9
    for gz in FASHION_MNIST_PATH.glob('*.gz'):  # the same files, uncompressed, in another folder
        (tmp_path / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    again = fashion_mnist(tmp_path)
    assert torch.equal(again.x_valid, xv) and torch.equal(again.y_train, y)


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as e: fashion_mnist(tmp_path)
    msg = str(e.value)
    assert 'dataset-fashion-mnist' in msg and 'train-images-idx3-ubyte.gz' in msg and 'path=' in msg


def test_tree_holds_the_right_images_and_is_written_once(png_tree, fmnist):
    fn = png_tree / 'training' / tree_label(FASHION_MNIST_CLASSES[int(fmnist.y_train[7])]) / '7.png'
    assert torch.equal(decode_image(str(fn))[0], fmnist.x_train[7])
    assert len(get_image_files(png_tree / 'training')) == 300
    before = fn.stat().st_mtime_ns
    fashion_mnist_tree(png_tree, n_train=300, n_valid=100)
    assert fn.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match='already holds'): fashion_mnist_tree(png_tree, n_train=50, n_valid=100)


# ------------------------------------------------------------------------------------------ the chapter code
def test_chapter_datablock_shapes_labels_vocab(dls, png_tree):
    xb, yb = first(dls.valid)
    assert xb.shape == (64, 1, 28, 28) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert dls.vocab == sorted(tree_label(c) for c in FASHION_MNIST_CLASSES) and dls.c == 10
    assert (len(dls.train), len(dls.valid), dls.train.n, dls.valid.n) == (300 // 64, 2, 300, 100)
    assert dls.train.shuffle and dls.train.drop_last and not dls.valid.shuffle and not dls.valid.drop_last
    # Labels match the folders the files are in (the valid loader keeps the file order).
    files = dls.valid.items[:64]
    assert [dls.vocab[i] for i in yb.tolist()] == [parent_label(f) for f in files]
    # The chapter's first DataBlock uses GrandparentSplitter's defaults, which this tree does not have.
    with pytest.raises(ValueError, match=r"'train'.*\['testing', 'training'\]"):
        DataBlock((ImageBlock(cls=PILImageBW), CategoryBlock), get_items=get_image_files,
                  splitter=GrandparentSplitter(), get_y=parent_label).dataloaders(png_tree)


def test_normalize_from_one_training_batch_gives_mean_0_std_1(dls):
    norm = dls.train.batch_tfms[-1]
    assert isinstance(norm, Normalize) and norm.mean.shape == (1,) and 0.2 < norm.mean.item() < 0.4
    xs = torch.cat([xb for xb, _ in dls.valid])
    assert abs(xs.mean().item()) < 0.1 and abs(xs.std().item() - 1) < 0.1
    raw = dls.valid.decode(xs)
    assert raw.min().item() >= -1e-5 and raw.max().item() <= 1 + 1e-5


def test_normalize_from_stats_and_decode(fmnist):
    norm = Normalize.from_stats([0.5], [0.25])
    x = fmnist.x_valid[:8, None].float() / 255
    assert torch.allclose(norm(x), (x - 0.5) / 0.25) and torch.allclose(norm.decode(norm(x)), x, atol=1e-6)
    with pytest.raises(RuntimeError, match='no statistics'): Normalize()(x)
    with pytest.raises(ValueError, match='3 channels'): Normalize.from_stats([0.5] * 3, [0.2] * 3)(x)


def test_show_batch_returns_figure_with_max_n_gray_axes(dls):
    fig = dls.show_batch(max_n=9, figsize=(4, 4))
    assert len(fig.axes) == 9
    assert fig.axes[0].images[0].get_cmap().name == 'gray'
    assert fig.axes[0].get_title() in dls.vocab


# ----------------------------------------------------------------------------------------- order and loader
def test_random_splitter_with_seed_is_deterministic(png_tree):
    items = get_image_files(png_tree)
    a, b, c = RandomSplitter(0.2, seed=42)(items), RandomSplitter(0.2, seed=42)(items), RandomSplitter(0.2, seed=1)(items)
    assert a == b and a != c and len(a[1]) == int(0.2 * len(items))
    assert sorted(a[0] + a[1]) == list(range(len(items)))


def test_order_is_reproducible_resumable_and_bs_applies_next_epoch(png_tree):
    block = chapter_block()
    torch.manual_seed(3)
    one = block.dataloaders(png_tree, bs=32, **CPU).train
    torch.manual_seed(3)
    two = block.dataloaders(png_tree, bs=32, **CPU).train
    assert one.seed == two.seed
    epoch0 = [yb for _, yb in one]
    assert all(torch.equal(a, b) for a, b in zip(epoch0, (yb for _, yb in two)))
    epoch1 = [yb for _, yb in one]  # a new iteration advances the epoch by itself
    assert one.epoch == 1 and not torch.equal(torch.cat(epoch0), torch.cat(epoch1))
    one.set_epoch(0, start_batch=5)
    resumed = [yb for _, yb in one]
    assert len(resumed) == len(epoch0) - 5 and all(torch.equal(a, b) for a, b in zip(resumed, epoch0[5:]))
    one.bs = 100
    assert len(one) == 3 and all(len(yb) == 100 for _, yb in one)


def test_shards_split_an_epoch_evenly(png_tree):
    dl = chapter_block().dataloaders(png_tree, bs=16, **CPU).valid  # 100 items
    full = torch.cat([yb for _, yb in dl])
    parts = []
    for rank in range(3):
        dl.shard(rank, 3)
        dl.set_epoch(0)
        parts.append(torch.cat([yb for _, yb in dl]))
    assert [len(p) for p in parts] == [34, 34, 34]  # ceil(100 / 3), padded by repeats
    pads = []
    for rank in range(3):
        dl.shard(rank, 3)
        pads.append(dl.n_pad)
    assert sum(pads) == 2 and [len(p) - n for p, n in zip(parts, pads)] == [34, 33, 33]
    interleaved = torch.stack([p[:33] for p in parts], 1).flatten()
    assert torch.equal(interleaved, full[:99])
    dl.shard(0, 1)
    assert torch.equal(torch.cat([yb for _, yb in dl]), full)


def test_augmentation_changes_training_batches_but_never_validation(png_tree):
    dls = chapter_block(batch_tfms=[Normalize(), *aug_transforms()]).dataloaders(png_tree, bs=64, seed=0, **CPU)
    assert [type(t).__name__ for t in dls.train.batch_tfms][-1] == 'Normalize'  # sorted: augment, then normalise
    dls.train.set_epoch(0)
    xa, ya = first(dls.train)
    dls.train.set_epoch(0)
    xb, yb = first(dls.train)
    assert torch.equal(ya, yb) and not torch.equal(xa, xb)
    v1, v2 = [x for x, _ in dls.valid], [x for x, _ in dls.valid]
    assert all(torch.equal(a, b) for a, b in zip(v1, v2))


@pytest.mark.parametrize('tfm', [Flip(p=1.), Rotate(30, p=1.), Brightness(0.3, p=1.), RandomCrop(28, padding=4)])
def test_each_augmentation_acts_in_training_only(fmnist, tfm):
    x = fmnist.x_valid[:16, None].float() / 255
    assert not torch.equal(tfm(x, True), x) and tfm(x, True).shape == x.shape
    assert torch.equal(tfm(x, False), x)


def test_item_transforms_resize_crop_and_random_resized_crop(png_tree):
    for tfm, shape in ((Resize(20), (20, 20)), (Resize((16, 24), method='pad'), (16, 24)),
                       (Resize((16, 24), method='squish'), (16, 24)), (CenterCrop(20), (20, 20))):
        xb, _ = chapter_block(item_tfms=tfm).dataloaders(png_tree, bs=8, **CPU).valid.one_batch()
        assert xb.shape[-2:] == shape, tfm
    dls = chapter_block(item_tfms=RandomResizedCrop(24, min_scale=0.3)).dataloaders(png_tree, bs=8, **CPU)
    dls.train.set_epoch(0)
    xa, _ = first(dls.train)
    dls.train.set_epoch(0)
    xb, _ = first(dls.train)
    assert xa.shape == (8, 1, 24, 24) and not torch.equal(xa, xb)
    assert torch.equal(dls.valid.one_batch()[0], dls.valid.one_batch()[0])


# ------------------------------------------------------------------------------------ other sources and modes
def test_from_tensors_uint8_and_float(fmnist):
    x, y, xv, yv, classes = fmnist
    dls = DataLoaders.from_tensors(x[:500], y[:500], xv[:200], yv[:200], bs=50, vocab=classes, **CPU)
    xb, yb = dls.one_batch()
    assert xb.shape == (50, 1, 28, 28) and 0 <= xb.min() and xb.max() <= 1 and dls.c == 10 and len(dls.train) == 10
    idx = dls.train.order(dls.train.epoch)[:50]
    assert torch.equal(xb, x[idx, None].float() / 255) and torch.equal(yb, y[idx])
    floats = DataLoaders.from_tensors(x[:100, None].float(), y[:100], xv[:50, None].float(), yv[:50], bs=10, **CPU)
    assert floats.valid.one_batch()[0].max() > 1 and floats.vocab == list(range(10))
    with pytest.raises(ValueError, match='vocab has 3 classes'):
        DataLoaders.from_tensors(x[:10], y[:10], xv[:10], yv[:10], vocab=['a', 'b', 'c'], **CPU)


def test_from_dsets_and_plain_torch_loaders(fmnist):
    from torch.utils.data import DataLoader, TensorDataset
    train, valid = TensorDataset(fmnist.x_train[:200, None], fmnist.y_train[:200]), \
        TensorDataset(fmnist.x_valid[:100, None], fmnist.y_valid[:100])
    dls = DataLoaders.from_dsets(train, valid, bs=32, batch_tfms=Normalize(), **CPU)
    xb, yb = first(dls.valid)
    assert xb.shape == (32, 1, 28, 28) and torch.equal(yb, fmnist.y_valid[:32]) and abs(xb.mean().item()) < 0.3
    plain = DataLoaders(DataLoader(train, batch_size=16), DataLoader(valid, batch_size=16))
    assert plain.bs == 16 and plain.vocab is None and plain.to('cpu').device == torch.device('cpu')


def test_gray_jpeg_tree_as_rgb_and_rgb_tree_as_gray(tmp_path, fmnist):
    jpg = fashion_mnist_tree(tmp_path / 'jpg', n_train=64, n_valid=32, fmt='jpg')
    block = DataBlock(blocks=(ImageBlock(cls=PILImage), CategoryBlock), get_items=get_image_files,
                      splitter=GrandparentSplitter('training', 'testing'), get_y=parent_label)
    xb, _ = block.dataloaders(jpg, bs=16, **CPU).valid.one_batch()
    assert xb.shape == (16, 3, 28, 28) and torch.equal(xb[:, 0], xb[:, 1])
    rgb = [colour(fmnist.x_train[i], i) for i in range(40)]
    labels = [FASHION_MNIST_CLASSES[int(c)].replace('/', '_') for c in fmnist.y_train[:40]]
    write_images(tmp_path / 'rgb', rgb, labels, fmt='png')
    dls = DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock), get_items=get_image_files,
                    splitter=RandomSplitter(0.25, seed=0), get_y=parent_label).dataloaders(tmp_path / 'rgb', bs=8, **CPU)
    assert dls.valid.one_batch()[0].shape == (8, 1, 28, 28) and dls.train.n + dls.valid.n == 40
    rgb_dls = DataBlock(get_items=get_image_files, splitter=RandomSplitter(0.25, seed=0),
                        get_y=parent_label).dataloaders(tmp_path / 'rgb', bs=8, **CPU)
    assert rgb_dls.valid.one_batch()[0].shape == (8, 3, 28, 28)
    fig = rgb_dls.show_batch(max_n=4)
    assert len(fig.axes) == 4 and fig.axes[0].images[0].get_array().shape == (28, 28, 3)


def test_regex_labeller_func_and_index_splitters(png_tree):
    items = get_image_files(png_tree)
    label = RegexLabeller(r'/([^/]+)/\d+\.png$')
    assert label(items[0]) == parent_label(items[0])
    with pytest.raises(ValueError, match='finds no group'): RegexLabeller(r'\.jpg$')(items[0])
    train, valid = FuncSplitter(lambda o: o.parent.parent.name == 'testing')(items)
    assert len(valid) == 100 and len(train) == 300
    assert IndexSplitter([0, 5])(items)[1] == [0, 5]


def test_streaming_when_over_cache_budget_matches_cache(png_tree):
    cached = chapter_block().dataloaders(png_tree, bs=32, **CPU)
    streamed = chapter_block().dataloaders(png_tree, bs=32, cache_budget=1000, num_workers=2, **CPU)
    a, b = [x for x, _ in cached.valid], [x for x, _ in streamed.valid]
    assert streamed.valid.source.streaming and len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_worker_processes_decode_the_same_cache(tmp_path):
    tree = fashion_mnist_tree(tmp_path / 'big', n_train=4200, n_valid=0)
    files = get_image_files(tree)
    serial, _, _ = decode_all(files, 'L', workers=0)
    parallel, kept, skipped = decode_all(files, 'L', workers=2)
    assert serial.shape == (4200, 1, 28, 28) and torch.equal(serial, parallel) and len(kept) == 4200 and not skipped


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def small_tree(tmp_path, png_tree):
    root = tmp_path / 'tree'
    shutil.copytree(png_tree, root)
    return root


def test_corrupt_file_is_named_or_skipped(small_tree):
    bad = sorted((small_tree / 'training' / 'Bag').glob('*.png'))[0]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    dls = chapter_block().dataloaders(small_tree, bs=64, seed=0, **CPU)
    with pytest.raises(ImageDecodeError, match=bad.name): dls.load()
    with pytest.warns(UserWarning, match=rf'Skipped 1 .*{bad.name}'):
        dls = chapter_block(batch_tfms=Normalize()).dataloaders(small_tree, bs=64, on_error='skip', **CPU)
    assert dls.skipped == [bad] and dls.train.n == 299 and bad not in dls.train.items
    assert sum(len(yb) for _, yb in dls.train) == 256


def test_non_image_files_are_ignored(small_tree):
    (small_tree / 'README.txt').write_text('not an image')
    (small_tree / 'training' / 'Bag' / 'labels.csv').write_text('a,b')
    (small_tree / 'training' / 'Bag' / 'UPPER.PNG').write_bytes((small_tree / 'training' / 'Bag').glob('*.png').__next__().read_bytes())
    files = get_image_files(small_tree)
    assert len(files) == 401 and all(f.suffix.lower() == '.png' for f in files)


def test_empty_split_and_unmatched_names_list_folders(png_tree):
    with pytest.raises(ValueError, match=r"'train'.*\['testing', 'training'\]"):
        chapter_block().__class__(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock), get_items=get_image_files,
                                  splitter=GrandparentSplitter('train', 'testing'), get_y=parent_label).dataloaders(png_tree)
    with pytest.raises(ValueError, match=r"validation split is empty.*\['testing', 'training'\]"):
        DataBlock(get_items=get_image_files, splitter=FuncSplitter(lambda o: False),
                  get_y=parent_label).dataloaders(png_tree)


def test_validation_label_not_in_training_vocab_is_named(small_tree):
    shutil.move(small_tree / 'testing' / 'Bag', small_tree / 'testing' / 'Handbag')
    with pytest.raises(ValueError, match=r"validation label 'Handbag'"):
        chapter_block().dataloaders(small_tree, **CPU)


def test_mixed_sizes_without_resize_name_two_files(tmp_path, fmnist):
    imgs = [fmnist.x_train[i][None] for i in range(12)] + [torch.zeros(1, 32, 30, dtype=torch.uint8)]
    files = write_images(tmp_path / 'mixed', imgs, ['a', 'b'] * 6 + ['a'])
    block = DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock), get_items=get_image_files,
                      splitter=IndexSplitter([0, 1]), get_y=parent_label)
    with pytest.raises(ValueError, match='Images differ in size') as e: block.dataloaders(tmp_path / 'mixed', **CPU).load()
    msg = str(e.value)
    assert f"{files[-1]} is 32x30" in msg and ".png is 28x28" in msg and 'Resize' in msg
    block.item_tfms = [Resize(28)]
    assert block.dataloaders(tmp_path / 'mixed', bs=4, **CPU).load().train.n == 11


def test_gray_and_rgb_files_mixed_are_converted(tmp_path, fmnist):
    imgs = [fmnist.x_train[i][None] if i % 2 else colour(fmnist.x_train[i], i) for i in range(20)]
    write_images(tmp_path / 'mixed', imgs, ['a', 'b'] * 10, fmt='jpg')
    for cls, channels in ((PILImageBW, 1), (PILImage, 3)):
        dls = DataBlock(blocks=(ImageBlock(cls=cls), CategoryBlock), get_items=get_image_files,
                        splitter=RandomSplitter(0.2, seed=0), get_y=parent_label).dataloaders(tmp_path / 'mixed', bs=4, **CPU)
        assert dls.load().train.source.cache.host_x.shape == (16, channels, 28, 28)


def test_prepare_makes_an_item_what_the_validation_loader_makes_of_it(png_tree):
    "A file's path, the image opened with PIL, or its decoded tensor: each becomes that file's row of the batch."
    from PIL import Image
    dls = chapter_block(item_tfms=Resize(20), batch_tfms=Normalize()).dataloaders(png_tree, bs=8, seed=0, **CPU)
    xb, _ = dls.valid.one_batch()
    file = dls.valid.items[3]
    for item in (file, str(file), Image.open(file), decode_image(str(file))):
        x = dls.valid.prepare(item)
        assert x.shape == (1, 1, 20, 20) and torch.allclose(x[0], xb[3], atol=1e-6), type(item)
    with pytest.raises(FileNotFoundError, match='no image file'): dls.valid.prepare(png_tree / 'missing.png')


def test_wrong_transform_kinds_are_rejected():
    with pytest.raises(TypeError, match='item transform'): chapter_block(batch_tfms=Resize(20))
    with pytest.raises(TypeError, match='batch transform'): chapter_block(item_tfms=Normalize())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_cache_on_device_and_pinned_host_path_agree_without_host_syncs(png_tree):
    tfms = [Normalize(), RandomCrop(28, padding=2), *aug_transforms()]
    on_gpu = chapter_block(batch_tfms=tfms).dataloaders(png_tree, bs=64, seed=0, device='cuda')
    via_host = chapter_block(batch_tfms=tfms).dataloaders(png_tree, bs=64, seed=0, device='cuda', device_cache_budget=0)
    a, b = [(x, y) for x, y in on_gpu.valid], [(x, y) for x, y in via_host.valid]
    assert on_gpu.valid.source.cache.x.is_cuda and not via_host.valid.source.cache.x.is_cuda
    assert a[0][0].is_cuda and b[0][0].is_cuda and a[0][1].dtype == torch.int64
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    for dl in (on_gpu.train, via_host.train): list(dl)  # first epoch: decode and place the caches
    torch.cuda.set_sync_debug_mode('error')  # any host-device sync in the batch path now raises
    try:
        for dl in (on_gpu.train, via_host.train):
            assert sum(1 for _ in dl) == len(dl)
    finally: torch.cuda.set_sync_debug_mode(0)
    xb, _ = on_gpu.to('cpu').valid.one_batch()
    assert xb.device.type == 'cpu'
