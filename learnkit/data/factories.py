"""`ImageDataLoaders.from_*`: fastai's factories, with fastai's argument names, each a thin door into `DataBlock`.

Each factory says where the items are and how they are labelled and split, builds the DataBlock, and calls its
`dataloaders`: one way to build loaders. Keyword arguments they do not name go to `DataBlock.dataloaders` (bs,
val_bs, device, num_workers, on_error, cache_budget, device_cache_budget). `seed` seeds the random split and the
training loader's shuffle, so a seeded call gives the same loaders twice.

Unlike fastai, file names that are relative are read relative to `path`, so `from_lists(path, ['a.jpg', ...])`
and a CSV of bare names both work; absolute names are used as they are.
"""
import csv
from operator import itemgetter
from pathlib import Path

from .block import (CategoryBlock, DataBlock, GrandparentSplitter, ImageBlock, MultiCategoryBlock, PILImage,
                    RandomSplitter, RegexLabeller, get_image_files, parent_label)
from .columns import ColReader, ColSplitter, column, is_table
from .loaders import DataLoaders

__all__ = ['ImageDataLoaders']


def _listy(x): return isinstance(x, (list, tuple))


def _resolve(path, fnames):
    "File names relative to `path` (absolute names are kept: `path / abs` is `abs`)."
    return [Path(path) / f for f in fnames]


def _name_of(label_func):
    "label_func applied to a file's name (fastai's `using_attr(label_func, 'name')`)."
    return lambda f: label_func(Path(f).name)


def _is_binary(series):
    # True == 1 and False == 0 in a set
    return set(series.unique().tolist()) <= {0, 1, True, False}  # sync-ok: pandas, not a tensor


class ImageDataLoaders(DataLoaders):
    """Factories for image classification data, fastai's `ImageDataLoaders`. Each returns learnkit
    `DataLoaders` built by a `DataBlock` (see the module's docstring for the arguments they share)."""

    @classmethod
    def from_dblock(cls, dblock, source, seed=None, **kwargs):
        "Loaders from `dblock` over `source`, as `dblock.dataloaders(source, seed=seed, **kwargs)`."
        return dblock.dataloaders(source, seed=seed, **kwargs)

    @classmethod
    def from_folder(cls, path, train='train', valid='valid', valid_pct=None, seed=None, vocab=None, item_tfms=None,
                    batch_tfms=None, img_cls=PILImage, **kwargs):
        """An ImageNet-style tree `path/<train>/<label>/*.jpg` and `path/<valid>/<label>/*.jpg`; or, with
        `valid_pct`, every image under `path` labelled by its folder and a random `valid_pct` of them held out.
        `vocab` fixes the classes and their order (default: the sorted training labels)."""
        if valid_pct is None:
            folders = (list(train) if _listy(train) else [train]) + (list(valid) if _listy(valid) else [valid])
            get_items, splitter = (lambda p: get_image_files(p, folders=folders)), GrandparentSplitter(train, valid)
        else: get_items, splitter = get_image_files, RandomSplitter(valid_pct, seed=seed)
        dblock = DataBlock(blocks=(ImageBlock(img_cls), CategoryBlock(vocab=vocab)), get_items=get_items,
                           splitter=splitter, get_y=parent_label, item_tfms=item_tfms, batch_tfms=batch_tfms)
        return cls.from_dblock(dblock, path, seed=seed, **kwargs)

    @classmethod
    def from_path_func(cls, path, fnames, label_func, valid_pct=0.2, seed=None, item_tfms=None, batch_tfms=None,
                       img_cls=PILImage, **kwargs):
        "Image files `fnames` (relative to `path`) labelled by `label_func(file path)`, a random `valid_pct` held out."
        dblock = DataBlock(blocks=(ImageBlock(img_cls), CategoryBlock), splitter=RandomSplitter(valid_pct, seed=seed),
                           get_y=label_func, item_tfms=item_tfms, batch_tfms=batch_tfms)
        return cls.from_dblock(dblock, _resolve(path, fnames), seed=seed, **kwargs)

    @classmethod
    def from_name_func(cls, path, fnames, label_func, **kwargs):
        "As `from_path_func`, with `label_func` given each file's name (`'cat_12.jpg'`) rather than its path."
        return cls.from_path_func(path, fnames, _name_of(label_func), **kwargs)

    @classmethod
    def from_path_re(cls, path, fnames, pat, **kwargs):
        "As `from_path_func`, the label being the first group of regular expression `pat` searched in each path."
        return cls.from_path_func(path, fnames, RegexLabeller(pat), **kwargs)

    @classmethod
    def from_name_re(cls, path, fnames, pat, **kwargs):
        "As `from_path_func`, the label being the first group of `pat` searched in each file's name."
        return cls.from_path_func(path, fnames, _name_of(RegexLabeller(pat)), **kwargs)

    @classmethod
    def from_df(cls, df, path='.', valid_pct=0.2, seed=None, fn_col=0, folder=None, suff='', label_col=1,
                label_delim=None, y_block=None, valid_col=None, item_tfms=None, batch_tfms=None, img_cls=PILImage,
                **kwargs):
        """A table (pandas DataFrame) of image files and labels. Files are `path/folder/<fn_col value><suff>`;
        columns are named, or int positions.

        The target block is `y_block`, or else: a `MultiCategoryBlock` when `label_delim` splits each cell into
        several labels, or when `label_col` lists several columns (one-hot 0/1 columns are read as encoded labels,
        the vocab being their names, other columns' values as labels); a 2-class `CategoryBlock` for one
        attribute column of -1/1 or 0/1 (the chapters' smile classifier: `label_col='Smiling'`); else a
        `CategoryBlock`. `valid_col` names a boolean-like column marking the validation rows (instead of a
        random `valid_pct`)."""
        if not is_table(df): raise TypeError(f"from_df takes a pandas DataFrame, got {type(df).__name__}")
        who = lambda arg, value: f"from_df({arg}={value!r})"
        for arg, cols in (('fn_col', fn_col), ('label_col', label_col), ('valid_col', valid_col)):
            for c in (cols if _listy(cols) else [] if cols is None else [cols]): column(df, c, who(arg, cols))
        if y_block is None: y_block = _label_block(df, label_col, label_delim)
        splitter = RandomSplitter(valid_pct, seed=seed) if valid_col is None else ColSplitter(valid_col)
        pref = Path(path) if folder is None else Path(path) / folder
        dblock = DataBlock(blocks=(ImageBlock(img_cls), y_block), get_x=ColReader(fn_col, pref=pref, suff=suff),
                           get_y=ColReader(label_col, label_delim=label_delim), splitter=splitter,
                           item_tfms=item_tfms, batch_tfms=batch_tfms)
        return cls.from_dblock(dblock, df, seed=seed, **kwargs)

    @classmethod
    def from_csv(cls, path, csv_fname='labels.csv', header='infer', delimiter=None, quoting=csv.QUOTE_MINIMAL,
                 **kwargs):
        "The CSV file `path/csv_fname` read by pandas, then `from_df(df, path=path, **kwargs)`."
        import pandas as pd
        fn = Path(path) / csv_fname
        if not fn.is_file():
            there = sorted(p.name for p in Path(path).glob('*.csv')) if Path(path).is_dir() else None
            where = f"CSV files there: {there}" if there is not None else f"{path} is not a folder"
            raise FileNotFoundError(f"from_csv: no file {fn}; {where}. Pass csv_fname=...")
        sep = {} if delimiter is None else {'delimiter': delimiter}  # an explicit None makes pandas sniff, slowly
        df = pd.read_csv(fn, header=header, quoting=quoting, **sep)
        return cls.from_df(df, path=path, **kwargs)

    @classmethod
    def from_lists(cls, path, fnames, labels, valid_pct=0.2, seed=None, y_block=None, item_tfms=None,
                   batch_tfms=None, img_cls=PILImage, **kwargs):
        """Image files `fnames` (relative to `path`) and their `labels`, a random `valid_pct` held out. A label
        that is a list (several labels per image) makes the targets multi-label (`MultiCategoryBlock`)."""
        fnames, labels = list(fnames), list(labels)
        if len(fnames) != len(labels):
            raise ValueError(f"from_lists: {len(fnames)} file names but {len(labels)} labels; give one label per file")
        if y_block is None: y_block = MultiCategoryBlock if labels and _listy(labels[0]) else CategoryBlock
        dblock = DataBlock(blocks=(ImageBlock(img_cls), y_block), get_x=itemgetter(0), get_y=itemgetter(1),
                           splitter=RandomSplitter(valid_pct, seed=seed), item_tfms=item_tfms, batch_tfms=batch_tfms)
        return cls.from_dblock(dblock, list(zip(_resolve(path, fnames), labels)), seed=seed, **kwargs)


def _label_block(df, label_col, label_delim):
    "The target block fastai would choose for these label columns, reading several 0/1 columns as encoded labels."
    if label_delim is not None: return MultiCategoryBlock()
    if _listy(label_col) and len(label_col) > 1:
        if all(_is_binary(column(df, c, f"from_df(label_col={label_col!r})")) for c in label_col):
            names = [df.columns[c] if isinstance(c, int) else c for c in label_col]
            return MultiCategoryBlock(encoded=True, vocab=names)
        return MultiCategoryBlock()
    return CategoryBlock()
