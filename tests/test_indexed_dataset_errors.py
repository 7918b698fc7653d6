"""Every kind of broken `.bin`/`.idx` pair is refused on open with an error that names the file and the fault.

Each test corrupts one field of a valid pair built here with `struct` (3 sequences of 2, 3, 1 tokens,
2 documents, uint16), so the reader's checks are exercised one at a time.
"""
import re
import struct

import numpy as np
import pytest

from megamath.data.indexed_dataset import IndexedDataset, IndexFormatError
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter

SIZES, DOC_IDX = [2, 3, 1], [0, 1, 3]
N, D = len(SIZES), len(DOC_IDX)


def build(tmp_path, *, magic=b"MMIDIDX\x00\x00", version=1, code=8, n=N, d=D, sizes=SIZES, pointers=None,
          doc_idx=DOC_IDX, extra=b"", cut=0, bin_bytes=None):
    """Write a (possibly corrupted) pair; returns the prefix."""
    if pointers is None:
        pointers = [0, 4, 10]
    idx = magic + struct.pack("<QBQQ", version, code, n, d)
    idx += struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(doc_idx)}q", *doc_idx) + extra
    (tmp_path / "ds.idx").write_bytes(idx[: len(idx) - cut])
    (tmp_path / "ds.bin").write_bytes(np.arange(6, dtype="<u2").tobytes() if bin_bytes is None else bin_bytes)
    return tmp_path / "ds"


def refused(prefix, message):
    """Opening fails with IndexFormatError whose message starts with the .idx/.bin path and contains `message`."""
    with pytest.raises(IndexFormatError, match=message) as info:
        IndexedDataset(prefix)
    assert str(info.value).startswith(str(prefix) + ".")
    return str(info.value)


def test_the_unbroken_pair_opens(tmp_path):
    ds = IndexedDataset(build(tmp_path))
    assert [ds[i].tolist() for i in range(3)] == [[0, 1], [2, 3, 4], [5]]
    assert issubclass(IndexFormatError, ValueError)  # the CLI reports ValueErrors as bad input


def test_missing_index(tmp_path):
    prefix = build(tmp_path)
    (tmp_path / "ds.idx").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"indexed dataset file not found: {prefix}.idx")):
        IndexedDataset(prefix)


def test_missing_bin(tmp_path):
    prefix = build(tmp_path)
    (tmp_path / "ds.bin").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"indexed dataset file not found: {prefix}.bin")):
        IndexedDataset(prefix)


def test_wrong_magic(tmp_path):
    message = refused(build(tmp_path, magic=b"TNTIDX\x00\x00\x00"), r"\.idx: bad magic b'TNTIDX")
    assert "not a Megatron MMIDIDX index" in message


def test_file_shorter_than_header(tmp_path):
    prefix = build(tmp_path)
    (tmp_path / "ds.idx").write_bytes(b"MMIDIDX\x00\x00" + b"\x01\x00")
    refused(prefix, r"\.idx: truncated header: 11 bytes, need 34")


def test_empty_index_file(tmp_path):
    prefix = build(tmp_path)
    (tmp_path / "ds.idx").write_bytes(b"")
    refused(prefix, r"\.idx: truncated header: 0 bytes, need 34")


def test_unknown_version(tmp_path):
    refused(build(tmp_path, version=2), r"\.idx: unsupported version 2, expected 1")


@pytest.mark.parametrize("code", [0, 9, 255])
def test_unknown_dtype_code(tmp_path, code):
    refused(build(tmp_path, code=code), rf"\.idx: unknown dtype code {code}, "
                                        r"expected one of \[1, 2, 3, 4, 5, 6, 7, 8\]")


def test_truncated_index(tmp_path):
    refused(build(tmp_path, cut=4), r"\.idx: truncated index: header says 3 sequences and 3 document indices "
                                    r"\(94 bytes\) but the file has 90 bytes")


def test_index_longer_than_header_says(tmp_path):
    refused(build(tmp_path, extra=b"\x00" * 8), r"\.idx: index longer than it should be: header says 3 sequences "
                                                r"and 3 document indices \(94 bytes\) but the file has 102 bytes")


def test_multimodal_index_is_named_as_such(tmp_path):
    """Megatron-LM's multimodal datasets add one int8 mode per sequence after the document indices: a
    valid file of Megatron's, not a corrupt one, and the message should say which it is."""
    message = refused(build(tmp_path, extra=b"\x00" * N), r"\.idx: index longer than it should be: .* the file "
                                                          r"has 97 bytes")
    assert message.endswith("(3 bytes more, one per sequence: Megatron-LM's multimodal sequence modes, "
                            "which megamath does not read)")


def test_header_count_disagrees_with_arrays(tmp_path):
    """N one too small: the arrays no longer line up, and the byte count says so."""
    refused(build(tmp_path, n=2), r"truncated|longer")


def test_bin_too_long(tmp_path):
    message = refused(build(tmp_path, bin_bytes=b"\x00" * 14), r"\.bin: has 14 bytes but its index describes "
                                                              r"6 tokens of uint16 = 12 bytes")
    assert message.startswith(str(tmp_path / "ds.bin"))


def test_bin_too_short(tmp_path):
    refused(build(tmp_path, bin_bytes=b"\x00" * 10), r"\.bin: has 10 bytes but .* = 12 bytes")


def test_pointers_inconsistent_with_sizes(tmp_path):
    refused(build(tmp_path, pointers=[0, 4, 8]), r"\.idx: pointers inconsistent with sizes: sequence 2 points "
                                                 r"at byte 8, expected 10")


def test_pointers_not_starting_at_zero(tmp_path):
    refused(build(tmp_path, pointers=[2, 6, 12]), r"pointers inconsistent with sizes: sequence 0 points at byte 2")


def test_negative_size(tmp_path):
    refused(build(tmp_path, sizes=[2, -3, 1]), r"\.idx: sequence 1 has negative length -3")


def test_document_indices_not_starting_at_zero(tmp_path):
    refused(build(tmp_path, doc_idx=[1, 1, 3]), r"\.idx: document indices must start at 0, got 1")


def test_document_indices_not_ending_at_n(tmp_path):
    refused(build(tmp_path, doc_idx=[0, 1, 2]), r"\.idx: document indices must end at the sequence count 3, got 2")


def test_document_indices_decreasing(tmp_path):
    refused(build(tmp_path, doc_idx=[0, 2, 1, 3], d=4), r"\.idx: document indices decrease at position 2: 2 then 1")


def test_no_document_indices(tmp_path):
    refused(build(tmp_path, doc_idx=[], d=0), r"\.idx: document indices are empty; they must start at 0 and end at 3")


# --- writer input errors --------------------------------------------------------------------------------

def test_writer_refuses_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match=r"dtype float16 cannot be stored in an indexed dataset \(supported: uint8"):
        IndexedDatasetWriter(tmp_path / "d", np.float16)


def test_writer_refuses_bad_tokens(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        with pytest.raises(ValueError, match=r"token ids in \[-1, 70000\] do not fit the dataset dtype uint16 "
                                             r"\[0, 65535\]"):
            w.add_document(np.array([5, -1, 70_000]))
        with pytest.raises(ValueError, match=r"tokens must be integers for a uint16 dataset, got float32"):
            w.add_document(np.zeros(3, np.float32))
        with pytest.raises(ValueError, match=r"tokens must be 1-D, got shape \(2, 2\)"):
            w.add_item(np.zeros((2, 2), np.int64))
        with pytest.raises(ValueError, match=r"lengths sum to 5 but 6 tokens were given"):
            w.add_documents(np.arange(6), np.array([2, 3]))
        with pytest.raises(ValueError, match=r"document lengths must lie in \[0, 2147483647\], got \[-1, 7\]"):
            w.add_documents(np.arange(6), np.array([-1, 7]))
        with pytest.raises(ValueError, match=r"lengths must be a 1-D integer array, got float64 of shape \(2,\)"):
            w.add_documents(np.arange(6), np.array([3.0, 3.0]))
        w.add_item(np.arange(2))
        with pytest.raises(ValueError, match=r"add_documents\(\) needs the current document closed"):
            w.add_documents(np.arange(6), np.array([3, 3]))
        w.end_document()
    assert IndexedDataset(tmp_path / "d").sizes.tolist() == [2]  # nothing of the refused calls was written


def test_add_dataset_refuses_other_dtype_and_open_document(tmp_path):
    with IndexedDatasetWriter(tmp_path / "a", np.int32) as w:
        w.add_document(np.arange(3))
    with IndexedDatasetWriter(tmp_path / "b", np.uint16) as w:
        with pytest.raises(ValueError, match=r"cannot add .*a: its dtype int32 differs from this writer's uint16"):
            w.add_dataset(tmp_path / "a")
    with IndexedDatasetWriter(tmp_path / "c", np.int32) as w:
        w.add_item(np.arange(2))
        with pytest.raises(ValueError, match=r"cannot add .*a while a document is open"):
            w.add_dataset(tmp_path / "a")
        w.end_document()
