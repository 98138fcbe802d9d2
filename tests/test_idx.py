"""The IDX reader and writer: round trips and every malformed-file error."""

import gzip
import os
import struct

import numpy as np
import pytest

from mpnn.data import DataError, load_idx_pair, read_idx, write_idx
from mpnn.data.idx import _MAX_NDIM  # NumPy's own limit: 64 since NumPy 2, 32 before


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_round_trip(tmp_path, dtype, suffix):
    rng = np.random.default_rng(1)
    low = 0 if dtype == "uint8" else -100
    array = rng.uniform(low, 100, (5, 3, 4)).astype(dtype)
    path = write_idx(tmp_path / f"a-idx3{suffix}", array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporaries


def test_layout_is_big_endian_with_standard_header(tmp_path):
    path = write_idx(tmp_path / "x", np.array([[1, 2, 3], [4, 5, 256]], dtype=np.int32))
    raw = path.read_bytes()
    assert raw[:4] == b"\x00\x00\x0c\x02"
    assert struct.unpack(">II", raw[4:12]) == (2, 3)
    assert struct.unpack(">6i", raw[12:]) == (1, 2, 3, 4, 5, 256)


def test_gz_output_is_gzip_and_reproducible(tmp_path):
    a = np.arange(10, dtype=np.uint8)
    p1, p2 = write_idx(tmp_path / "a.gz", a), write_idx(tmp_path / "b.gz", a)
    assert p1.read_bytes()[:2] == b"\x1f\x8b"
    assert p1.read_bytes() == p2.read_bytes()
    assert gzip.decompress(p1.read_bytes())[:4] == b"\x00\x00\x08\x01"


def test_gzip_content_without_gz_name_is_read(tmp_path):
    plain = write_idx(tmp_path / "a", np.arange(6, dtype=np.uint8))
    disguised = tmp_path / "b"
    disguised.write_bytes(gzip.compress(plain.read_bytes()))
    np.testing.assert_array_equal(read_idx(disguised), np.arange(6))


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(DataError, match="cannot store dtype uint16"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.uint16))


# ------------------------------------------------------------------- malformed files


def _raw(tmp_path, data, name="bad-idx3-ubyte"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _expect(path, *fragments):
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope", "no such file")


def test_bad_magic(tmp_path):
    path = _raw(tmp_path, b"<html>404 Not Found</html>")
    _expect(path, "not an IDX file", "two zero bytes", "download again")


def test_unknown_dtype_code(tmp_path):
    path = _raw(tmp_path, b"\x00\x00\x0a\x01" + struct.pack(">I", 2) + b"\x00\x00")
    _expect(path, "unknown IDX dtype code 0x0A")


def test_zero_dimensions(tmp_path):
    _expect(_raw(tmp_path, b"\x00\x00\x08\x00"), "0 dimensions")


def _ones_header(ndim):
    """An IDX ubyte header of ``ndim`` dimensions of size 1, and its one data byte."""
    return bytes([0, 0, 8, ndim]) + struct.pack(f">{ndim}I", *[1] * ndim) + b"\7"


@pytest.mark.parametrize("ndim", [_MAX_NDIM + 1, 255])
def test_more_dimensions_than_numpy_holds(tmp_path, ndim):
    # a consistent file NumPy cannot shape: the error used to be NumPy's, naming no file
    path = _raw(tmp_path, _ones_header(ndim))
    _expect(path, f"declares {ndim} dimensions, more than the {_MAX_NDIM}", "download again")


def test_as_many_dimensions_as_numpy_holds(tmp_path):
    assert read_idx(_raw(tmp_path, _ones_header(_MAX_NDIM))).shape == (1,) * _MAX_NDIM


def test_dangling_symlink(tmp_path):
    link = tmp_path / "train-images-idx3-ubyte"
    link.symlink_to(tmp_path / "gone")
    _expect(link, f"a dangling symlink (to {tmp_path / 'gone'}, which does not exist)")


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe-idx1-ubyte"
    os.mkfifo(fifo)
    _expect(fifo, "not a regular file")
    _expect(tmp_path, "is a directory")


def test_write_into_a_missing_directory_names_the_file(tmp_path):
    path = tmp_path / "nowhere" / "a-idx1-ubyte"
    with pytest.raises(DataError, match=f"{path}: cannot write the file .*nowhere exists"):
        write_idx(path, np.arange(3, dtype=np.uint8))


def test_short_header(tmp_path):
    _expect(_raw(tmp_path, b"\x00\x00"), "too short", "truncated")
    _expect(_raw(tmp_path, b"\x00\x00\x08\x03" + struct.pack(">I", 60000), name="b"),
            "declares 3 dimensions", "truncated")


def test_truncated_payload(tmp_path):
    header = b"\x00\x00\x08\x03" + struct.pack(">III", 60000, 28, 28)
    path = _raw(tmp_path, header + bytes(1200))
    _expect(path, "expected 47040000 bytes", "found 1200", "truncated", "download again")


def test_truncated_payload_wider_items(tmp_path):
    path = _raw(tmp_path, b"\x00\x00\x0d\x01" + struct.pack(">I", 4) + bytes(15))
    _expect(path, "expected 16 bytes", "found 15", "truncated")


def test_trailing_bytes(tmp_path):
    header = b"\x00\x00\x08\x01" + struct.pack(">I", 3)
    path = _raw(tmp_path, header + bytes(5))
    _expect(path, "expected 3 bytes", "2 trailing bytes")


def test_truncated_payload_inside_gzip(tmp_path):
    header = b"\x00\x00\x08\x02" + struct.pack(">II", 10, 10)
    path = _raw(tmp_path, gzip.compress(header + bytes(50)), name="a.gz")
    _expect(path, "expected 100 bytes", "found 50", "truncated")


def test_corrupt_gzip_stream(tmp_path):
    good = gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 4000) + bytes(range(250)) * 16)
    cut = _raw(tmp_path, good[: len(good) // 2], name="cut.gz")
    _expect(cut, "corrupt gzip stream", "download again")
    flipped = bytearray(good)
    flipped[-6] ^= 0xFF  # inside the CRC-32 trailer
    _expect(_raw(tmp_path, bytes(flipped), name="crc.gz"), "corrupt gzip stream")


def test_gz_name_without_gzip_content(tmp_path):
    plain = write_idx(tmp_path / "a", np.arange(3, dtype=np.uint8))
    renamed = plain.rename(tmp_path / "a.gz")
    _expect(renamed, "not gzip-compressed")


# ------------------------------------------------------------------------- pairs


def _pair(tmp_path, n_images, labels, image_shape=(2, 2)):
    images = write_idx(tmp_path / "images-idx3-ubyte",
                       np.zeros((n_images, *image_shape), dtype=np.uint8))
    labels = write_idx(tmp_path / "labels-idx1-ubyte", np.asarray(labels, dtype=np.uint8))
    return images, labels


def test_pair_ok(tmp_path):
    images, labels = load_idx_pair(*_pair(tmp_path, 3, [0, 9, 4]), num_classes=10)
    assert images.shape == (3, 2, 2)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 9, 4]


def test_pair_count_mismatch(tmp_path):
    images_path, labels_path = _pair(tmp_path, 3, [0, 1])
    with pytest.raises(DataError) as info:
        load_idx_pair(images_path, labels_path)
    message = str(info.value)
    assert str(images_path) in message and str(labels_path) in message
    assert "3 images" in message and "2 labels" in message


def test_pair_label_out_of_range(tmp_path):
    images_path, labels_path = _pair(tmp_path, 2, [0, 10])
    with pytest.raises(DataError, match=r"labels must lie in \[0, 10\), found values from 0 to 10"):
        load_idx_pair(images_path, labels_path, num_classes=10)


def test_pair_swapped_files(tmp_path):
    images_path, labels_path = _pair(tmp_path, 2, [0, 1])
    with pytest.raises(DataError, match="is it an images file"):
        load_idx_pair(labels_path, images_path)
