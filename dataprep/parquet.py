"""Parquet input for `read_documents` (`documents.py`): one document a row, with the `parquet` extra.

A row's "line number" is its 1-based number across the whole file. pyarrow is imported inside the
functions, never at module import, so `lmpipe --help` stays light and the extra stays optional.

Parquet values become JSON values, since dedup writes records back out as JSON lines. A row has
every column (null where a JSON line would leave the field out); strings, numbers, booleans and
nulls stay as they are, structs become objects, lists arrays, and
  timestamp, date, time  ISO 8601 text (`datetime.isoformat()`: "2024-05-01T12:00:00+00:00");
                         nanoseconds are cut to microseconds, as Python's datetime holds them
  duration               seconds, a number
  decimal                its text ("12.50"), exact
  binary                 UTF-8 text when it decodes, else base64 text
  map                    an array of [key, value] pairs (arrow maps may repeat or type keys)
  anything else          its text (`str(value)`)
Floating-point NaN and infinities pass through as Python's json module writes them (`NaN`,
`Infinity`), as they would from a JSON line: lmpipe and Python read them back, strict JSON parsers
do not. Columns that hold none of these cost no conversion. `text` itself must be a string column: it is
never converted, so a binary `text` is an invalid row like a JSON number would be. A row holding a
value Python cannot read (invalid UTF-8 in a string column, a date past year 9999) is an invalid
row. A file without a `text` column is an error under strict, otherwise every row is invalid for
that reason. Rows are read row group by row group, so a corrupt page keeps the groups before it.
Memory is a row group's, not a batch's: about 2-3x the largest group's text per worker.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import importlib.util
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError

# Rows per Parquet record batch: bounds the Python records held at once (documents of a few kB
# to a few MB), while each batch is still large enough to amortise arrow's per-call cost.
PARQUET_BATCH_ROWS = 1024
READ_BYTES = 1 << 20
NEEDS_PYARROW = "reading .parquet needs pyarrow: pip install 'lmpipe[parquet]'"


def is_parquet(path: Path) -> bool:
    return path.name.endswith(".parquet")


def require_pyarrow(path: Path) -> None:
    """An error naming `path` when pyarrow, which reads it, is not installed (checked without
    importing it: `lmpipe --help` stays light)."""
    if importlib.util.find_spec("pyarrow") is None:
        raise LmpipeError(f"{path}: {NEEDS_PYARROW}")


def json_value(value: Any) -> Any:
    """A value read from Parquet as a JSON value, by the rules of the module docstring."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # a tuple is a map's (key, value) entry
        return [json_value(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):  # a datetime is a date too
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)  # not a float: the digits stay exact
    if isinstance(value, (bytes, bytearray)):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    if isinstance(value, numbers.Real):  # a numpy float16, from older pyarrow
        return float(value)
    return str(value)


def _plain(t: Any) -> bool:
    """Whether pyarrow gives JSON values for arrow type `t` as they are: no conversion to pay."""
    import pyarrow as pa

    if pa.types.is_map(t):  # a list type in arrow, but its entries come out as tuples
        return False
    if pa.types.is_struct(t):
        return all(_plain(t.field(i).type) for i in range(t.num_fields))
    if isinstance(t, (pa.ListType, pa.LargeListType, pa.FixedSizeListType, pa.DictionaryType)):
        return _plain(t.value_type)
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_integer(t)
        or pa.types.is_boolean(t)
        or pa.types.is_null(t)
        or t in (pa.float32(), pa.float64())
    )


def _microseconds(t: Any) -> Any:
    """`t` with nanosecond timestamps, times and durations made microsecond ones. pyarrow gives a
    nanosecond value that is not whole microseconds as a pandas Timestamp when pandas is installed,
    and raises otherwise: casting first makes the output one thing, whatever is installed."""
    import pyarrow as pa

    if getattr(t, "unit", None) == "ns":
        if pa.types.is_timestamp(t):
            return pa.timestamp("us", t.tz)
        if pa.types.is_time64(t):
            return pa.time64("us")
        if pa.types.is_duration(t):
            return pa.duration("us")
    if pa.types.is_struct(t):
        fields = [t.field(i) for i in range(t.num_fields)]
        return pa.struct([f.with_type(_microseconds(f.type)) for f in fields])
    if pa.types.is_map(t):
        return pa.map_(_microseconds(t.key_type), _microseconds(t.item_type))
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_microseconds(t.value_type)))
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_microseconds(t.value_type)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_microseconds(t.value_type)), t.list_size)
    return t


@dataclass
class _Conversion:
    """What a file's schema needs before its rows are JSON records, worked out once per file."""

    cast: Any  # the schema to cast each batch to (nanoseconds -> microseconds), or None
    columns: list[str]  # the columns whose values `json_value` converts

    @classmethod
    def of(cls, schema: Any) -> _Conversion:
        import pyarrow as pa

        cast = pa.schema([f.with_type(_microseconds(f.type)) for f in schema])
        # `text` is never converted: a binary one stays bytes, an invalid row (module docstring)
        columns = [f.name for f in schema if f.name != "text" and not _plain(f.type)]
        return cls(None if cast.equals(schema) else cast, columns)

    def records(self, batch: Any) -> Iterator[tuple[dict[str, Any] | None, str]]:
        """(record, "") for each row of a record batch, or (None, reason) for a row pyarrow cannot
        give as Python values (invalid UTF-8 in a string column, a date past year 9999)."""
        import pyarrow as pa

        if self.cast is not None:
            arrays = [
                c.cast(f.type, safe=False) for c, f in zip(batch.columns, self.cast, strict=True)
            ]
            batch = pa.RecordBatch.from_arrays(arrays, schema=self.cast)
        try:
            rows = [(r, "") for r in batch.to_pylist()]
        except Exception:  # some row holds one (see `_one_row`): find which, one row at a time
            rows = [_one_row(batch, i) for i in range(batch.num_rows)]
        for record, reason in rows:
            if record is not None:
                for name in self.columns:
                    record[name] = json_value(record[name])
            yield record, reason


def _one_row(batch: Any, i: int) -> tuple[dict[str, Any] | None, str]:
    record = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            record[name] = column[i].as_py()
        except UnicodeDecodeError as e:
            return None, f"column {name!r}: invalid UTF-8 at byte {e.start}"
        # Any other error of a value Python cannot hold: a date past year 9999 (OverflowError),
        # a timestamp out of range (ValueError), a type pyarrow cannot convert.
        except Exception as e:
            return None, f"column {name!r}: unreadable value ({e})"
    return record, ""


def open_parquet(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Buffered reads, not pre-buffered column chunks, so the file is not read ahead. pyarrow
        # still decodes a whole column chunk (a whole row group's text) to give even one small
        # batch, so smaller batches would not help: a worker's memory is about 2-3x the largest
        # row group's text (measured on one 94 MB group: reading it alone adds 190 MB at 1,024
        # rows a batch, 130 MB at 8; dedup of 97 MB of text in one group peaks at 306 MB, of
        # the same text as JSON lines at 94 MB). Page checksums, where the writer stored them,
        # catch corrupt data.
        return pq.ParquetFile(
            path, buffer_size=READ_BYTES, pre_buffer=False, page_checksum_verification=True
        )
    except (pa.ArrowException, OSError) as e:
        raise LmpipeError(f"{path}: not a readable parquet file ({e})") from None


def parquet_rows(
    path: Path, on_bytes: Callable[[int], None] | None = None
) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(row number from 1, record as JSON values, "") for each row of a Parquet file, or (row
    number, None, reason) for a row Python cannot hold. Read by record batches; `on_bytes` reports
    the file's bytes in proportion to the rows read, adding up to its size (`open_text_lines`).
    A file that cannot be read (not Parquet, truncated, corrupt) raises `LmpipeError` where it
    breaks off, after the rows read before."""
    with open_parquet(path) as file:
        yield from batch_rows(file, path, on_bytes)


def batch_rows(
    file: Any, path: Path, on_bytes: Callable[[int], None] | None
) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    import pyarrow as pa

    conversion = _Conversion.of(file.schema_arrow)
    size, total = path.stat().st_size, file.metadata.num_rows
    row_no = reported = 0
    # Row group by row group: a batch never spans two, so damage in one keeps every row of the
    # groups before it (one batch of a file's first rows could hold several small groups).
    for group in range(file.metadata.num_row_groups):
        batches = file.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group])
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as e:
                raise LmpipeError(f"{path}: not a readable parquet file ({e})") from None
            if batch is None:
                break
            for record, reason in conversion.records(batch):
                row_no += 1
                yield row_no, record, reason
            if on_bytes is not None and total:
                position = size * row_no // total
                on_bytes(position - reported)
                reported = position
    if on_bytes is not None:
        on_bytes(size - reported)
