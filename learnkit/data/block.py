"""The data block API (fastai's names): blocks say what the inputs and targets are, `get_items` finds the
items, a splitter divides them, a labeller names each one, and `DataBlock.dataloaders` builds the loaders."""
import os
import re
from pathlib import Path

import torch
from torch import nn

from .columns import is_table, table_rows
from .images import IMAGE_EXTENSIONS
from .loaders import DataLoaders, check_batch_tfms
from .sources import ImageFiles
from .transforms import check_item_tfms

__all__ = ['PILImage', 'PILImageBW', 'ImageBlock', 'CategoryBlock', 'MultiCategoryBlock', 'DataBlock',
           'get_image_files', 'RandomSplitter', 'GrandparentSplitter', 'FuncSplitter', 'IndexSplitter', 'parent_label',
           'RegexLabeller']


class PILImage:
    "Marks an image block as colour: files are decoded as 3-channel RGB (gray files are converted)."
    mode = 'RGB'


class PILImageBW(PILImage):
    "Marks an image block as grayscale: files are decoded as 1-channel (colour files are converted)."
    mode = 'L'


class ImageBlock:
    "Image inputs; `cls` is `PILImage` (RGB) or `PILImageBW` (grayscale)."
    def __init__(self, cls=PILImage):
        if not (isinstance(cls, type) and issubclass(cls, PILImage)):
            raise TypeError(f"ImageBlock(cls={cls!r}): use PILImage (RGB) or PILImageBW (grayscale)")
        self.cls = cls

    @property
    def mode(self): return self.cls.mode


def _unknown_label_error(split, unknown, names, items, vocab, given, block):
    where = f"is not in {block}(vocab=...)" if given else "does not occur in the training set"
    return ValueError(f"{split} label {', '.join(names[:5])} (e.g. {items[unknown[0]]}, {len(unknown)} items) {where}; "
                      f"the vocab is {vocab}. Move or relabel those items, or pass {block}(vocab=[...]) listing every "
                      f"class.")


def _sorted_vocab(found):
    try: return sorted(found)
    except TypeError as e:
        raise TypeError(f"labels must be sortable to make the vocab; got types "
                        f"{sorted({type(v).__name__ for v in found})}") from e


class CategoryBlock:
    """Single-label class targets, as int64 class indices; the vocab is the sorted training labels unless `vocab`
    is given. The default loss is cross-entropy."""
    def __init__(self, vocab=None): self.vocab = None if vocab is None else list(vocab)

    def loss_func(self): return nn.CrossEntropyLoss()

    def encode(self, labels, train_idx, valid_idx, items):
        """Return (vocab, training targets, validation targets), the targets int64 tensors; raise naming any
        unknown label. `items` name the items in messages."""
        for i, lab in enumerate(labels):
            if isinstance(lab, (list, tuple, set)):
                raise TypeError(f"CategoryBlock: the label of {items[i]} is {lab!r}, several labels; a CategoryBlock "
                                f"takes one label per item. Use MultiCategoryBlock for several (from_df and from_csv "
                                f"choose it when label_delim is given and y_block is not)")
        vocab = self.vocab if self.vocab is not None else _sorted_vocab({labels[i] for i in train_idx})
        index = {v: i for i, v in enumerate(vocab)}
        for split, idx in (('training', train_idx), ('validation', valid_idx)):
            unknown = [i for i in idx if labels[i] not in index]
            if unknown:
                names = sorted({repr(labels[i]) for i in unknown}, key=str)
                raise _unknown_label_error(split, unknown, names, items, vocab, self.vocab is not None, 'CategoryBlock')
        y_train, y_valid = (torch.tensor([index[labels[i]] for i in idx], dtype=torch.int64)
                            for idx in (train_idx, valid_idx))
        return vocab, y_train, y_valid


class MultiCategoryBlock:
    """Multi-label targets, as float32 multi-hot rows (1. for each label an item has). The default loss is
    `BCEWithLogitsLoss`; predictions decode by a threshold (see `Learner.get_preds` and `Learner.predict`).

    Each item's labels are a list (`ColReader(col, label_delim=' ')` splits a cell into one), and the vocab is
    the sorted labels of the training set unless `vocab` is given. With `encoded=True` each item's labels are
    already one 0/1 value per class of `vocab` (several 0/1 columns of a table: `ColReader(vocab)`)."""
    def __init__(self, encoded=False, vocab=None):
        if encoded and vocab is None:
            raise ValueError("MultiCategoryBlock(encoded=True) needs vocab=[the class names, one per encoded value]")
        self.encoded, self.vocab = encoded, None if vocab is None else list(vocab)

    def loss_func(self): return nn.BCEWithLogitsLoss()

    def encode(self, labels, train_idx, valid_idx, items):
        "Return (vocab, training targets, validation targets), the targets (n, len(vocab)) float32 multi-hot rows."
        if self.encoded:
            return (self.vocab, *(self._encoded([labels[i] for i in idx], [items[i] for i in idx])
                                  for idx in (train_idx, valid_idx)))
        for i, lab in enumerate(labels):
            if not isinstance(lab, (list, tuple, set, frozenset)):
                hint = ("split such cells into labels with label_delim=' ' (from_df, from_csv, ColReader)"
                        if isinstance(lab, str) else "make get_y return a list of labels")
                raise TypeError(f"MultiCategoryBlock: the labels of {items[i]} are {lab!r}, not a list of labels; "
                                f"{hint}")
        vocab = self.vocab if self.vocab is not None else _sorted_vocab({v for i in train_idx for v in labels[i]})
        index = {v: i for i, v in enumerate(vocab)}
        for split, idx in (('training', train_idx), ('validation', valid_idx)):
            unknown = [i for i in idx if any(v not in index for v in labels[i])]
            if unknown:
                names = sorted({repr(v) for i in unknown for v in labels[i] if v not in index}, key=str)
                raise _unknown_label_error(split, unknown, names, items, vocab, self.vocab is not None,
                                           'MultiCategoryBlock')

        def multi_hot(idx):
            y = torch.zeros(len(idx), len(vocab))
            rows = [r for r, i in enumerate(idx) for _ in labels[i]]
            y[rows, [index[v] for i in idx for v in labels[i]]] = 1.
            return y
        return vocab, multi_hot(train_idx), multi_hot(valid_idx)

    def _encoded(self, labels, items):
        c = len(self.vocab)
        if c == 1: labels = [lab if isinstance(lab, (list, tuple)) else [lab] for lab in labels]  # ColReader(['a'])
        for lab, item in zip(labels, items):
            if not isinstance(lab, (list, tuple)) or len(lab) != c:
                raise ValueError(f"MultiCategoryBlock(encoded=True): the labels of {item} are {lab!r}; each item needs "
                                 f"{c} values, one 0/1 per class of vocab={self.vocab}")
        y = torch.tensor(labels, dtype=torch.float32).reshape(len(labels), c)
        bad = ((y != 0) & (y != 1)).any(1).nonzero().flatten().tolist()  # sync-ok: host labels, once when building
        if bad:
            raise ValueError(f"MultiCategoryBlock(encoded=True): the labels of {items[bad[0]]} are {labels[bad[0]]} "
                             f"({len(bad)} items have values other than 0/1). Encoded labels are one 0/1 per class; "
                             f"for a -1/1 attribute table, map -1 to 0 first: df[cols] = (df[cols] > 0).astype(int)")
        return y


TARGET_BLOCKS = (CategoryBlock, MultiCategoryBlock)


# --------------------------------------------------------------------------------------------------- getters
def _subfolders(path):
    return sorted(d.name for d in Path(path).iterdir() if d.is_dir()) if Path(path).is_dir() else []


def get_image_files(path, recurse=True, folders=None):
    """Image files under `path` (extensions matched case-insensitively, hidden folders skipped), sorted.
    `folders` limits the search to those subfolders of `path`. Other files are ignored."""
    path = Path(path)
    if not path.is_dir(): raise FileNotFoundError(f"get_image_files: {path} is not a folder")
    roots = [path] if folders is None else [path / f for f in ([folders] if isinstance(folders, str) else folders)]
    for root in roots:
        if not root.is_dir():
            empty = ' (the folder is empty)' if not any(path.iterdir()) else ''
            raise FileNotFoundError(f"get_image_files: no folder {root.name!r} in {path}; folders present: "
                                    f"{_subfolders(path)}{empty}")
    files = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith('.')) if recurse else []
            folder = Path(dirpath)  # `folder / name` parses only the name: twice as fast as Path(dirpath, name)
            files += [folder / f for f in sorted(filenames) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return files


def _ancestor(o, k):
    "The name of `o`'s k-th enclosing folder ('' above the top); a string split, several times faster than Path.parent."
    parts = os.fspath(o).rsplit(os.sep, k + 1)
    return parts[-k - 1] if len(parts) > k else ''


def parent_label(o):
    "The name of the folder holding `o`."
    return _ancestor(o, 1)


class RegexLabeller:
    "Label an item by the first group of `pat` searched in its path (or matched from the start with `match=True`)."
    def __init__(self, pat, match=False):
        self.pat, self._find = pat, (re.compile(pat).match if match else re.compile(pat).search)

    def __call__(self, o):
        m = self._find(os.fspath(o).replace(os.sep, '/'))
        if m is None or not m.groups():
            raise ValueError(f"RegexLabeller({self.pat!r}) finds no group in {o}; the pattern needs a (group) that matches every item")
        return m.group(1)


# ------------------------------------------------------------------------------------------------- splitters


def _names(x): return {x} if isinstance(x, str) else set(x)


class RandomSplitter:
    "Put a random `valid_pct` of the items in the validation set; `seed` makes the split reproducible."
    def __init__(self, valid_pct=0.2, seed=None):
        if not 0 < valid_pct < 1: raise ValueError(f"RandomSplitter(valid_pct={valid_pct}): use 0 < valid_pct < 1")
        self.valid_pct, self.seed = valid_pct, seed

    def __call__(self, items):
        g = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(items), generator=g).tolist()  # sync-ok: a CPU permutation, once per split
        cut = int(self.valid_pct * len(items))
        return idx[cut:], idx[:cut]


class GrandparentSplitter:
    "Split by the name of each item's grandparent folder (`path/<train_name>/<label>/file`)."
    def __init__(self, train_name='train', valid_name='valid'): self.train_name, self.valid_name = train_name, valid_name

    def __call__(self, items):
        gp = [_ancestor(o, 2) for o in items]
        train, valid = _names(self.train_name), _names(self.valid_name)
        split = [i for i, g in enumerate(gp) if g in train], [i for i, g in enumerate(gp) if g in valid]
        for name, idx in zip((self.train_name, self.valid_name), split):
            if not idx:
                raise ValueError(f"GrandparentSplitter found no files under a folder named {name!r}; grandparent "
                                 f"folders present: {sorted(set(gp))}. Pass train_name=..., valid_name=...")
        return split


class FuncSplitter:
    "Put the items for which `func(item)` is true in the validation set."
    def __init__(self, func): self.func = func

    def __call__(self, items):
        valid = [bool(self.func(o)) for o in items]
        return [i for i, v in enumerate(valid) if not v], [i for i, v in enumerate(valid) if v]


class IndexSplitter:
    "Put the items at positions `valid_idx` in the validation set."
    def __init__(self, valid_idx): self.valid_idx = [int(i) for i in valid_idx]

    def __call__(self, items):
        bad = [i for i in self.valid_idx if not 0 <= i < len(items)]
        if bad: raise IndexError(f"IndexSplitter: indices {bad[:5]} are outside 0..{len(items) - 1}")
        valid = set(self.valid_idx)
        return [i for i in range(len(items)) if i not in valid], sorted(valid)


# ------------------------------------------------------------------------------------------------- DataBlock
def _describe(source):
    "Where items were looked for, for messages: a folder and its subfolders, or a table's size."
    if is_table(source): return f"the table ({len(source)} rows, columns {list(source.columns)})"
    if isinstance(source, (str, os.PathLike)): return f"{source} (folders present: {_subfolders(source)})"
    return f"the {type(source).__name__} given"


def _no_items_message(source):
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        entries = sorted(p.name for p in Path(source).iterdir())
        if not entries: return f"no items: the folder {source} is empty. Put the images in it (one folder per class)"
        return (f"no image files in {source} (extensions {sorted(IMAGE_EXTENSIONS)}); it holds {entries[:10]}"
                f"{' ...' if len(entries) > 10 else ''}")
    return f"no items found in {_describe(source)}"


def _read(getter, items, rows):
    "getter applied to every item; on a table, a ColReader reads whole columns, other functions get rows (Series)."
    if rows is None: return [getter(o) for o in items]
    if hasattr(getter, 'read_column'): return getter.read_column(items)
    return [getter(r) for r in rows()]


def _check_files(files, items):
    "Every item must be an image file that exists; name the missing ones and how many there are."
    for f, item in zip(files, items):
        if not isinstance(f, (str, os.PathLike)):
            raise TypeError(f"the image of item {item!r} is {f!r}, not a file path: get_x (or the items) must give "
                            f"image file paths")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(files)} image files are missing from disk: "
                                f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}. Check the "
                                f"folder and file names they are read with (get_x; from_df/from_csv: path=, folder=, "
                                f"suff=), or remove those rows")


class DataBlock:
    """How to build DataLoaders from a source, the fastai way:

    `DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock), get_items=get_image_files,
    splitter=GrandparentSplitter('training', 'testing'), get_y=parent_label, batch_tfms=Normalize()).dataloaders(path)`

    `get_items(source)` lists the items (default: `source` is the list, or a pandas DataFrame whose rows are the
    items), `get_x(item)` gives the image file (default: the item), `get_y(item)` its label (a class for a
    `CategoryBlock`, a list of labels for a `MultiCategoryBlock`), `splitter(items)` the training and validation
    positions (default `RandomSplitter()`). Over a DataFrame, `ColReader` getters read whole columns and
    other getters get each row as a pandas Series. Item transforms run once at decode time; batch transforms on
    every batch."""
    def __init__(self, blocks=(ImageBlock, CategoryBlock), get_items=None, splitter=None, get_y=None, get_x=None,
                 item_tfms=None, batch_tfms=None):
        blocks = [b() if isinstance(b, type) else b for b in blocks]
        if len(blocks) != 2 or not isinstance(blocks[0], ImageBlock) or not isinstance(blocks[1], TARGET_BLOCKS):
            raise TypeError(f"DataBlock supports blocks=(ImageBlock, CategoryBlock or MultiCategoryBlock), got "
                            f"{blocks}")
        if get_y is None: raise ValueError("DataBlock needs get_y to label the items, e.g. get_y=parent_label")
        self.image_block, self.target_block = blocks
        self.get_items, self.get_x, self.get_y = get_items, get_x, get_y
        self.splitter = RandomSplitter() if splitter is None else splitter
        self.item_tfms, self.batch_tfms = check_item_tfms(item_tfms), check_batch_tfms(batch_tfms)

    def dataloaders(self, source, bs=64, val_bs=None, device=None, seed=None, num_workers=None, on_error='raise',
                    cache_budget=None, device_cache_budget=None):
        """Build the DataLoaders. Images are decoded at the first epoch (or `dls.load()`), by `num_workers`
        processes (default: one per core, at most 8), into a uint8 cache when it fits `cache_budget` bytes
        (default a quarter of RAM), else per batch. `on_error='skip'` leaves unreadable files out with a
        warning (listed in `dls.skipped`) and decodes now, so the loaders' lengths are final; 'raise' names them.
        Files that do not exist always raise, named: they are a listing error, not a bad file."""
        items = self.get_items(source) if self.get_items is not None else source
        if not is_table(items): items = list(items)
        if not len(items): raise ValueError(_no_items_message(source))
        rows = (lambda: table_rows(items)) if is_table(items) else None
        files = _read(self.get_x, items, rows) if self.get_x is not None else items
        if is_table(files): raise TypeError("the items are a table: give DataBlock a get_x that reads the file names, "
                                            "e.g. get_x=ColReader('fname', pref=path)")
        _check_files(files, items)
        labels = _read(self.get_y, items, rows)
        train_idx, valid_idx = self.splitter(items)
        for name, idx in (('training', train_idx), ('validation', valid_idx)):
            if not len(idx):
                raise ValueError(f"the {name} split is empty ({len(items)} items in {_describe(source)}); check the "
                                 f"splitter {self.splitter!r}")
        vocab, y_train, y_valid = self.target_block.encode(labels, train_idx, valid_idx, files)

        def source_of(idx, y):
            return ImageFiles([files[i] for i in idx], y, self.image_block.mode, self.item_tfms, num_workers,
                              on_error, cache_budget)
        train, valid = source_of(train_idx, y_train), source_of(valid_idx, y_valid)
        if on_error == 'skip': train.load(), valid.load()
        batch_tfms = [t.batch_part for t in self.item_tfms if t.batch_part is not None] + self.batch_tfms
        return DataLoaders.from_sources(train, valid, bs=bs, val_bs=val_bs, batch_tfms=batch_tfms, vocab=vocab,
                                        device=device, seed=seed, device_cache_budget=device_cache_budget,
                                        loss_func=self.target_block.loss_func())
