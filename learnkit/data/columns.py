"""Items from a table (a pandas DataFrame, such as a CSV of file names and labels), the fastai way: `ColReader`
reads columns, `ColSplitter` splits on a boolean column.

A DataBlock whose source is a table reads each ColReader's columns in one go (`read_column`) rather than row by
row, so a CelebA-sized CSV (200,000 rows) costs a fraction of a second; that read also checks that the columns
exist and hold no missing values, naming what is wrong.
"""
import os
from pathlib import Path

__all__ = ['ColReader', 'ColSplitter', 'is_table', 'column', 'table_rows']


def is_table(o) -> bool:
    "Whether `o` is a pandas DataFrame (checked by its interface, so pandas is imported only by those who use it)."
    return hasattr(o, 'columns') and hasattr(o, 'iloc') and hasattr(o, 'iterrows')


def table_rows(df):
    "The rows of `df` as pandas Series, as fastai hands them to a get_x/get_y function (`row['col']`, `row.col`)."
    return [row for _, row in df.iterrows()]


def _rows(mask, df, limit=10):
    "The index labels of the rows where `mask` is true, at most `limit` of them, as a readable string."
    rows = df.index[mask.to_numpy()].tolist()  # sync-ok: a pandas index, not a tensor
    return f"{rows[:limit]}{' ...' if len(rows) > limit else ''}"


def column(df, col, who):
    """Column `col` of `df` (a name, or an int position as in fastai) as a Series. Raises, naming `who` asks for
    it and the columns there are, when it is not there, and naming the rows when it has missing values (NaN, or
    empty cells of a CSV)."""
    names = list(df.columns)
    if isinstance(col, int) and not isinstance(col, bool):
        if not -len(names) <= col < len(names):
            raise ValueError(f"{who}: column position {col} is outside the table's {len(names)} columns {names}")
        s = df.iloc[:, col]
    elif col in names: s = df[col]
    else: raise ValueError(f"{who}: no column {col!r} in the table; its columns are {names}")
    missing = s.isna()
    if missing.any():
        n_missing = int(missing.sum())  # sync-ok: a pandas Series, not a tensor
        raise ValueError(f"{who}: column {s.name!r} has {n_missing} missing value(s) (NaN, or an empty CSV "
                         f"cell), in rows {_rows(missing, df)}; fill them or drop those rows, e.g. "
                         f"df.dropna(subset=[{s.name!r}])")
    return s


class ColReader:
    """Read column(s) `cols` (names, or int positions) of a table row, as fastai's ColReader: with `pref` and
    `suff` around the value (image file names: `ColReader('fname', pref=path/'images', suff='.jpg')`), or split
    by `label_delim` into a list of labels (multi-label; an empty cell gives no labels). Several `cols` give
    the list of their values. A `pref` that is a Path gets a trailing separator, as in fastai."""
    def __init__(self, cols, pref='', suff='', label_delim=None):
        self.cols = list(cols) if isinstance(cols, (list, tuple)) else [cols]
        if not self.cols: raise ValueError("ColReader needs at least one column")
        self.pref = str(pref) + os.sep if isinstance(pref, Path) else str(pref)
        self.suff, self.label_delim = str(suff), label_delim

    def _one(self, value):
        if self.label_delim is not None: return str(value).split(self.label_delim) if str(value) else []
        return f'{self.pref}{value}{self.suff}' if self.pref or self.suff else value

    @property
    def _plain(self): return not (self.pref or self.suff) and self.label_delim is None

    def __call__(self, row):
        "The value(s) in one row: a pandas Series, a namedtuple (from `itertuples`), a dict or a sequence."
        def cell(c):
            if hasattr(row, 'iloc'): return row.iloc[c] if isinstance(c, int) else row[c]
            return getattr(row, c) if c in getattr(row, '_fields', ()) else row[c]
        values = [self._one(cell(c)) for c in self.cols]
        return values[0] if len(values) == 1 else values

    def read_column(self, df):
        "What `self(row)` gives for every row of `df`, read column by column, checking each column."
        columns = [column(df, c, repr(self)).tolist() for c in self.cols]  # sync-ok: pandas, to Python values
        if not self._plain: columns = [[self._one(v) for v in values] for values in columns]
        return columns[0] if len(columns) == 1 else [list(r) for r in zip(*columns)]

    def __repr__(self):
        cols = self.cols[0] if len(self.cols) == 1 else self.cols
        extra = ''.join(f", {k}={v!r}" for k, v in (('pref', self.pref), ('suff', self.suff),
                                                    ('label_delim', self.label_delim)) if v)
        return f"ColReader({cols!r}{extra})"


_TRUE, _FALSE = frozenset({'true', 'yes', '1'}), frozenset({'false', 'no', '0'})


def _as_bool(value):
    "True/False for a boolean-like cell (bool, 0/1, 'True'/'False', 'yes'/'no'); None for anything else."
    if isinstance(value, bool): return value
    if isinstance(value, (int, float)) and value in (0, 1): return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE or v in _FALSE: return v in _TRUE
    return None


class ColSplitter:
    """Split a table's rows by column `col` (name or int position): the rows where it is true go to the
    validation set. With `on`, the rows whose value equals `on` (or is in it, for a list) do, as in fastai.
    Without `on`, the column must be boolean-like (True/False, 1/0, 'yes'/'no'): other values raise, named,
    rather than being read as true as any non-empty string would be."""
    def __init__(self, col='is_valid', on=None): self.col, self.on = col, on

    def __call__(self, df):
        if not is_table(df):
            raise TypeError(f"{self!r} splits a table (pandas DataFrame) of items; the items are a "
                            f"{type(df).__name__}")
        values = column(df, self.col, repr(self)).tolist()  # sync-ok: a pandas Series, not a tensor
        if self.on is not None:
            on = list(self.on) if isinstance(self.on, (list, tuple, set)) else [self.on]
            valid = [v in on for v in values]
        else:
            valid = [_as_bool(v) for v in values]
            bad = [i for i, v in enumerate(valid) if v is None]
            if bad:
                shown = sorted({repr(values[i]) for i in bad[:10]})
                rows = df.index[bad].tolist()[:10]  # sync-ok: a pandas index, not a tensor
                raise ValueError(f"{self!r}: column {self.col!r} must be boolean-like (True/False or 1/0) to mark the "
                                 f"validation rows; it holds {', '.join(shown)} in rows {rows}. "
                                 f"Fix the column, or pass ColSplitter({self.col!r}, on=<the value marking validation "
                                 f"rows>)")
        return [i for i, v in enumerate(valid) if not v], [i for i, v in enumerate(valid) if v]

    def __repr__(self): return f"ColSplitter({self.col!r}{'' if self.on is None else f', on={self.on!r}'})"
