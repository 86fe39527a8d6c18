"""Bad datasets fail in one line naming the file, the column and the row, before anything is trained or written.

Real files have holes: a CSV's empty cell is read as None, labels are written as words, a validation file comes
from another export with other columns. Rows without text are dropped (one WARNING line says how many and from
where); anything else training cannot use is a `UserError`. The checks run on Arrow columns, so they cost
milliseconds on large datasets and never copy the text into Python.
"""

from __future__ import annotations

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from resumable.config import TrainConfig
from resumable.corpus import CLS_LABEL_NAMES
from resumable.errors import UserError
from resumable.logs import get_logger

log = get_logger(__name__)
NO_DATA = "corresponds to no data"  # datasets' error for a split whose file has a header and no rows


def diagnose_load_failure(
    builder: str, files: dict[str, str], sources: dict[str, str], err: Exception, cache_dir: str
) -> UserError:
    """Why `load_dataset(builder, data_files=files)` failed, as one line naming the file at fault.

    datasets reads every split in one builder, so a header-only validation file or one with other columns makes
    the whole load fail; reading each file alone tells which one it is and what differs.
    """
    columns = {}
    for split, path in files.items():
        try:
            columns[split] = datasets.load_dataset(builder, data_files={split: path}, cache_dir=cache_dir)[
                split
            ].column_names
        except Exception as one:  # noqa: BLE001 - any parse error is about this file
            return _file_error(sources[split], builder, one)
    if len(columns) == 2 and set(columns["train"]) != set(columns["validation"]):
        train, val = columns["train"], columns["validation"]
        only_train = [c for c in train if c not in val]
        only_val = [c for c in val if c not in train]
        diff = "; ".join(
            part
            for part in (
                only_train and f"only in the training file: {', '.join(only_train)}",
                only_val and f"only in the validation file: {', '.join(only_val)}",
            )
            if part
        )
        return UserError(
            f"{sources['train']} and {sources['validation']} have different columns ({diff}); "
            "give both files the same columns"
        )
    return _file_error(sources["train"], builder, err)


def _file_error(source: str, builder: str, err: Exception) -> UserError:
    if NO_DATA in str(err):
        return UserError(f"{source}: no examples (the file has no data rows)")
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return UserError(f"{source}: could not be read as {builder} ({lines[0] if lines else type(err).__name__})")


def clean_split(
    cfg: TrainConfig, ds: datasets.Dataset, source: str, keep_blank: bool, label_names: list[str] | None = None
) -> datasets.Dataset:
    """`ds` with its rows without text dropped and its labels as class ids in 0..num_labels-1, or a UserError.

    `keep_blank`: a blank line of a .txt file is content (a paragraph break), only a missing value is dropped.
    `label_names`: the training split's names for string labels (None for the training split itself).
    """
    if len(ds) == 0:
        raise UserError(f"{source}: no examples")
    texts = cfg.text_columns
    flags = {cfg.label_column: "--label_column", cfg.text_column: "--text_column"}
    flags.update({cfg.source_column: "--source_column", cfg.target_column: "--target_column"} if len(texts) > 1 else {})
    for col in [*texts] + ([cfg.label_column] if cfg.task == "sequence_classification" else []):
        if col not in ds.column_names:
            raise UserError(f"{source}: no column {col!r} (set {flags[col]}; columns: {', '.join(ds.column_names)})")
    if ds._indices is not None:  # row numbers in messages are the file's; a hub split may come pre-selected
        ds = ds.flatten_indices()
    drop = pa.array([False] * len(ds))
    for col in texts:
        missing, blank = _empty_text(col, ds.data.column(col).combine_chunks(), source, flags[col])
        if pc.all(pc.or_kleene(missing, blank)).as_py():
            raise UserError(f"{source}: column {col!r} is empty in every row ({len(ds)} rows)")
        drop = pc.or_kleene(drop, missing if keep_blank else pc.or_kleene(missing, blank))
    if cfg.task == "sequence_classification":
        ds = _check_labels(cfg, ds, source, pc.invert(drop), label_names)
    dropped = pc.sum(drop).as_py() or 0
    if dropped:  # only select when needed: an untouched dataset keeps its fingerprint, so every cache still hits
        ds = ds.select(pc.cast(pc.indices_nonzero(pc.invert(drop)), pa.int64()).to_numpy())
        which = " or ".join(repr(c) for c in texts)
        log.warning(f"{source}: dropped {dropped} of {dropped + len(ds)} rows whose {which} is empty")
    return ds


def _empty_text(column: str, col: pa.Array, source: str, flag: str) -> tuple[pa.Array, pa.Array]:
    """(missing, blank) masks of a text column."""
    if pa.types.is_null(col.type) or col.null_count == len(col):  # a CSV column with no text at all is float64
        everywhere = pa.array([True] * len(col))
        return everywhere, everywhere
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise UserError(f"{source}: column {column!r} holds {col.type} values, not text (set {flag})")
    return pc.is_null(col), pc.fill_null(pc.equal(pc.utf8_length(col), 0), False)


def _first(mask: pa.Array) -> int | None:
    index = pc.index(mask, True).as_py()
    return None if index < 0 else index


def _check_labels(
    cfg: TrainConfig, ds: datasets.Dataset, source: str, used: pa.Array, train_names: list[str] | None
) -> datasets.Dataset:
    """Check the labels of the rows that will be used (`used`); return `ds` with int64 or ClassLabel labels."""
    name, n = cfg.label_column, cfg.num_labels
    feature = ds.features[name]
    col = ds.data.column(name).combine_chunks()
    if isinstance(feature, datasets.ClassLabel):  # hub datasets: ids already, -1 means "no label"
        _refuse_too_many(cfg, source, feature.names)
        missing = pc.fill_null(pc.less(col, 0), True)
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):  # e.g. "positive"/"negative" in a CSV
        missing = pc.fill_null(pc.equal(pc.utf8_length(col), 0), True)
    elif pa.types.is_boolean(col.type) or pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        missing = pc.is_null(col)  # an empty cell in an int column makes the column float64, with nulls
    elif pa.types.is_null(col.type):
        missing = pa.array([True] * len(col))
    else:
        raise UserError(f"{source}: column {name!r} holds {col.type} values, not class labels (set --label_column)")
    row = _first(pc.and_(used, missing))
    if row is not None:
        raise UserError(f"{source}: row {row + 1} has no label (column {name!r})")
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        if train_names is None:  # the training split names the classes: sorted, so the same on every run
            train_names = sorted(pc.unique(pc.filter(col, used)).to_pylist())
            _refuse_too_many(cfg, source, train_names)
        unknown = pc.and_(used, pc.invert(pc.is_in(col, value_set=pa.array(train_names, col.type))))
        row = _first(unknown)
        if row is not None:
            raise UserError(
                f"{source}: label {col[row].as_py()!r} at row {row + 1} is not one of the training data's labels "
                f"({', '.join(train_names)})"
            )
        # ids in sorted-name order; rows about to be dropped (no text) may have none: -1, ClassLabel's "no label"
        codes = pc.fill_null(pc.index_in(col, value_set=pa.array(train_names, col.type)), -1)
        features = ds.features.copy()
        features[name] = datasets.ClassLabel(names=train_names)
        return ds.remove_columns(name).add_column(name, codes.to_pylist()).cast(features)
    if pa.types.is_floating(col.type):
        fractional = pc.and_(used, pc.fill_null(pc.not_equal(col, pc.floor(col)), False))
        row = _first(fractional)
        if row is not None:
            raise UserError(f"{source}: label {col[row].as_py()} at row {row + 1} is not a class id (column {name!r})")
    if not isinstance(feature, datasets.ClassLabel):
        values = pc.fill_null(pc.cast(col, pa.int64(), safe=False), 0)  # fractional ones were refused above
        bad = pc.and_(used, pc.or_(pc.less(values, 0), pc.greater_equal(values, n)))
        row = _first(bad)
        if row is not None:
            raise UserError(
                f"{source}: label {values[row].as_py()} at row {row + 1} is outside 0..{n - 1} (--num_labels {n})"
            )
        if feature != datasets.Value("int64"):  # bool (e.g. CodeXGLUE's `target`), or float from empty cells
            ds = ds.cast_column(name, datasets.Value("int64"))
    return ds


def _refuse_too_many(cfg: TrainConfig, source: str, names: list[str]) -> None:
    if len(names) > cfg.num_labels:
        shown = ", ".join(map(str, names[:10])) + (", ..." if len(names) > 10 else "")
        raise UserError(
            f"--num_labels {cfg.num_labels}: {source} has {len(names)} classes ({shown}); "
            f"pass --num_labels {len(names)}"
        )


def label_names(cfg: TrainConfig, raw: datasets.DatasetDict) -> list[str] | None:
    """The classes' names for the model's `id2label`: a ClassLabel's (hub datasets, string labels of a file, mapped
    in sorted order), the embedded corpus's, or None (plain ids: the model keeps LABEL_0, LABEL_1, ...)."""
    if cfg.task != "sequence_classification":
        return None
    feature = raw["train"].features.get(cfg.label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if not (cfg.dataset_name or cfg.train_file):
        return list(CLS_LABEL_NAMES)
    return None
