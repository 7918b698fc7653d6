"""The indexed dataset writes Megatron-LM's MMIDIDX layout byte for byte and reads it back without copying.

The expected bytes are built here with `struct` from the format's description, never with the writer,
so a writer and reader that agree on a wrong layout still fail.
"""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from megamath.data.indexed_dataset import IndexedDataset, best_dtype, data_file_path, index_file_path
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter
from megamath.data.dataset_tools import merge_datasets

CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}

# Documents as lists of sequences; document 1 spans three sequences, document 3 is an empty sequence.
DOCS = [[[5, 6, 7]], [[1, 2], [3], [4, 4, 4, 4]], [[9]], [[]], [[2, 1, 0, 3, 3]]]


def expected_files(docs, dtype):
    """(.idx bytes, .bin bytes) of `docs`, built from the format description alone."""
    dtype = np.dtype(dtype)
    sizes = [len(seq) for doc in docs for seq in doc]
    pointers, offset = [], 0
    for size in sizes:
        pointers.append(offset)
        offset += size * dtype.itemsize
    doc_idx = [0]
    for doc in docs:
        doc_idx.append(doc_idx[-1] + len(doc))
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", CODES[dtype.type])
    idx += struct.pack("<QQ", len(sizes), len(doc_idx))
    idx += struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(sizes)}q", *pointers)
    idx += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    bin_ = b"".join(np.asarray(seq, dtype=f"<{dtype.str[1:]}").tobytes() for doc in docs for seq in doc)
    return idx, bin_


def write(prefix, docs, dtype):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            for seq in doc:
                writer.add_item(np.asarray(seq, dtype=np.int64))
            writer.end_document()
    return prefix


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.int64, np.float32])
def test_bytes_match_the_format(tmp_path, dtype):
    write(tmp_path / "d", DOCS, dtype)
    idx = index_file_path(tmp_path / "d").read_bytes()
    want_idx, want_bin = expected_files(DOCS, dtype)
    assert idx == want_idx
    assert data_file_path(tmp_path / "d").read_bytes() == want_bin
    # The same fields, read at their documented byte offsets.
    n, d = 7, 6
    assert idx[0:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", idx, 9)[0] == 1
    assert struct.unpack_from("<B", idx, 17)[0] == CODES[dtype]
    assert struct.unpack_from("<QQ", idx, 18) == (n, d)
    assert struct.unpack_from(f"<{n}i", idx, 34) == (3, 2, 1, 4, 1, 0, 5)
    itemsize = np.dtype(dtype).itemsize
    assert struct.unpack_from(f"<{n}q", idx, 34 + 4 * n) == tuple(itemsize * o for o in (0, 3, 5, 6, 10, 11, 11))
    assert struct.unpack_from(f"<{d}q", idx, 34 + 12 * n) == (0, 1, 4, 5, 6, 7)
    assert len(idx) == 34 + 12 * n + 8 * d


def test_reads_hand_built_files(tmp_path):
    """The reader accepts files written by anyone who follows the format (here: struct, not our writer)."""
    idx, bin_ = expected_files(DOCS, np.int32)
    index_file_path(tmp_path / "x").write_bytes(idx)
    data_file_path(tmp_path / "x").write_bytes(bin_)
    ds = IndexedDataset(tmp_path / "x")
    assert ds.dtype == np.int32 and len(ds) == 7 and ds.num_documents == 5 and ds.num_tokens == 16
    assert [ds[i].tolist() for i in range(len(ds))] == [seq for doc in DOCS for seq in doc]
    assert ds.sizes.dtype == np.int32 and ds.pointers.dtype == np.int64 and ds.document_indices.dtype == np.int64
    assert ds.sizes.tolist() == [3, 2, 1, 4, 1, 0, 5]
    assert ds.document_indices.tolist() == [0, 1, 4, 5, 6, 7]


def test_best_dtype_and_paths(tmp_path):
    assert best_dtype(32_000) == np.uint16 and best_dtype(65_499) == np.uint16
    assert best_dtype(65_500) == np.int32 and best_dtype(128_256) == np.int32
    # The extension is appended: a dotted prefix keeps its dots.
    assert data_file_path("a/train.v1").name == "train.v1.bin"
    assert index_file_path(tmp_path / "train.v1") == tmp_path / "train.v1.idx"


def test_round_trip_sequences_spans_and_documents(tmp_path):
    ds = IndexedDataset(write(tmp_path / "d", DOCS, np.uint16))
    flat = [seq for doc in DOCS for seq in doc]
    assert [ds[i].tolist() for i in range(len(ds))] == flat
    assert ds[-1].tolist() == flat[-1] and [s.tolist() for s in ds[1:3]] == flat[1:3]
    assert ds[0].dtype == np.uint16
    assert ds.get(3).tolist() == [4, 4, 4, 4]
    assert ds.get(6, offset=1, length=3).tolist() == [1, 0, 3]
    assert ds.get(6, offset=2).tolist() == [0, 3, 3]
    assert ds.get(6, offset=5).tolist() == []
    assert ds.document_indices.tolist() == [0, 1, 4, 5, 6, 7]
    assert (ds.num_documents, ds.num_tokens) == (5, 16)
    with pytest.raises(IndexError, match=r"sequence 7 out of range for .* with 7 sequences"):
        ds[7]
    with pytest.raises(IndexError, match=r"span offset=4 length=2 is outside sequence 6 of 5 tokens"):
        ds.get(6, offset=4, length=2)


def _memmap_under(array):
    """The np.memmap an array is a view of, or None when it owns its data (a copy)."""
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    return base


def test_reads_are_zero_copy_views(tmp_path):
    ds = IndexedDataset(write(tmp_path / "d", DOCS, np.int32))
    seq, span = ds[6], ds.get(6, offset=1, length=2)
    assert np.shares_memory(seq, span)
    tokens_map = _memmap_under(ds[0])
    assert isinstance(tokens_map, np.memmap)
    assert str(tokens_map.filename) == str(data_file_path(tmp_path / "d").resolve())
    assert _memmap_under(seq) is tokens_map and _memmap_under(span) is tokens_map  # one memmap of the .bin
    assert str(_memmap_under(ds.sizes).filename) == str(index_file_path(tmp_path / "d").resolve())
    assert not seq.flags.writeable


def test_add_documents_equals_one_document_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, size=40)
    tokens = rng.integers(0, 50_000, size=int(lengths.sum()))
    with IndexedDatasetWriter(tmp_path / "slow", np.uint16) as w:
        for doc in np.split(tokens, np.cumsum(lengths)[:-1]):
            w.add_document(doc)
    with IndexedDatasetWriter(tmp_path / "fast", np.uint16) as w:
        w.add_documents(np.zeros(0, np.int64), np.zeros(0, np.int64))  # nothing: a no-op
        cut = 17
        w.add_documents(tokens[: lengths[:cut].sum()], lengths[:cut])
        w.add_documents(tokens[lengths[:cut].sum():], lengths[cut:])
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"fast{ext}").read_bytes() == (tmp_path / f"slow{ext}").read_bytes()


def test_zero_token_documents_given_as_empty_lists(tmp_path):
    """`[]` and `np.array([])` are float64 to numpy, yet hold no value that could fail to fit: a 0-token
    document (Megatron's builder accepts one) must not be refused as "not integers"."""
    with IndexedDatasetWriter(tmp_path / "lists", np.uint16) as w:
        w.add_document([])
        w.add_item(np.array([]))
        w.add_item([7, 8])
        w.end_document()
        w.add_documents([], [])
    with IndexedDatasetWriter(tmp_path / "arrays", np.uint16) as w:
        w.add_document(np.zeros(0, np.uint16))
        w.add_item(np.zeros(0, np.uint16))
        w.add_item(np.array([7, 8], np.uint16))
        w.end_document()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"lists{ext}").read_bytes() == (tmp_path / f"arrays{ext}").read_bytes()
    assert IndexedDataset(tmp_path / "lists").sizes.tolist() == [0, 0, 2]


def test_empty_dataset(tmp_path):
    with IndexedDatasetWriter(tmp_path / "e", np.int32):
        pass
    assert (tmp_path / "e.bin").stat().st_size == 0
    assert (tmp_path / "e.idx").read_bytes() == b"MMIDIDX\x00\x00" + struct.pack("<QBQQq", 1, 4, 0, 1, 0)
    ds = IndexedDataset(tmp_path / "e")
    assert (len(ds), ds.num_documents, ds.num_tokens) == (0, 0, 0)
    assert ds.sizes.tolist() == [] and ds.document_indices.tolist() == [0]
    with pytest.raises(IndexError, match="sequence 0 out of range"):
        ds[0]


def test_fingerprint_follows_content_not_path(tmp_path):
    a = IndexedDataset(write(tmp_path / "a", DOCS, np.uint16))
    b = IndexedDataset(write(tmp_path / "b", DOCS, np.uint16))
    c = IndexedDataset(write(tmp_path / "c", DOCS[:-1], np.uint16))
    d = IndexedDataset(write(tmp_path / "d", DOCS, np.int32))
    assert a.fingerprint() == b.fingerprint() == IndexedDataset(tmp_path / "a").fingerprint()
    assert len({a.fingerprint(), c.fingerprint(), d.fingerprint()}) == 3


def test_fingerprint_is_of_the_files_opened_not_of_a_later_rewrite(tmp_path):
    """The fingerprint keys the index cache, so it must describe the sizes this object reads. A dataset
    rewritten under the same prefix after opening (a re-run of preprocess) must not lend its fingerprint
    to the old sizes: indices built from those would be cached under the new data's key and served to
    every later run as that data's indices."""
    expected = IndexedDataset(write(tmp_path / "x", DOCS, np.uint16)).fingerprint()
    opened = IndexedDataset(tmp_path / "x")
    write(tmp_path / "x", DOCS[:-1], np.uint16)  # replaced atomically; `opened` still maps the old files
    assert opened.sizes.tolist() == [3, 2, 1, 4, 1, 0, 5]
    assert opened.fingerprint() == expected
    assert IndexedDataset(tmp_path / "x").fingerprint() != expected


def test_merge_equals_a_single_writer(tmp_path):
    parts = [DOCS[:2], [], DOCS[2:4], DOCS[4:]]
    prefixes = [write(tmp_path / f"part{i}", docs, np.uint16) for i, docs in enumerate(parts)]
    merged = merge_datasets(prefixes, tmp_path / "merged")
    write(tmp_path / "single", DOCS, np.uint16)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"single{ext}").read_bytes()
    # Seams are offset, not duplicated: part0 ends at sequence 4, part2 adds 1 and 1, part3 adds 1.
    assert merged.document_indices.tolist() == [0, 1, 4, 5, 6, 7]
    assert len(merged) == 7 and merged.num_documents == 5


def test_merge_twice_the_same_dataset(tmp_path):
    write(tmp_path / "a", DOCS[:2], np.int32)
    merged = merge_datasets([tmp_path / "a", tmp_path / "a"], tmp_path / "m")
    assert merged.document_indices.tolist() == [0, 1, 4, 5, 8]
    assert merged.pointers.tolist() == [4 * o for o in (0, 3, 5, 6, 10, 13, 15, 16)]


def test_merge_refuses_mixed_dtypes_and_no_inputs(tmp_path):
    write(tmp_path / "a", DOCS, np.uint16)
    write(tmp_path / "b", DOCS, np.int32)
    mixed = r"cannot merge .*b \(int32\) with .*a \(uint16\): all inputs must share one dtype"
    with pytest.raises(ValueError, match=mixed):
        merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    with pytest.raises(ValueError, match="merge needs at least one input dataset"):
        merge_datasets([], tmp_path / "m")
    assert not (tmp_path / "m.idx").exists() and not (tmp_path / "m.bin").exists()


# --- atomic publishing ---------------------------------------------------------------------------------

def test_exception_inside_with_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
            w.add_document(np.arange(10))
            assert len(os.listdir(tmp_path)) == 1  # the temporary .bin, not under its final name
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_old_dataset_untouched_until_finalize(tmp_path):
    write(tmp_path / "d", DOCS, np.uint16)
    old = {ext: (tmp_path / f"d{ext}").read_bytes() for ext in (".bin", ".idx")}
    writer = IndexedDatasetWriter(tmp_path / "d", np.uint16)
    writer.add_document(np.arange(100_000) % 7)
    writer.end_document()  # Megatron semantics: a boundary with no new sequence is an empty document
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"d{ext}").read_bytes() == old[ext]
    writer.finalize()
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    assert IndexedDataset(tmp_path / "d").document_indices.tolist() == [0, 1, 1]


def test_aborted_overwrite_keeps_old_dataset(tmp_path):
    write(tmp_path / "d", DOCS, np.uint16)
    with pytest.raises(ValueError, match="1 sequence\\(s\\) of .* were added after the last end_document"):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
            w.add_item(np.arange(5))  # a document never closed: finalize refuses, the with aborts
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    assert IndexedDataset(tmp_path / "d").sizes.tolist() == [3, 2, 1, 4, 1, 0, 5]


def test_crash_between_renames_never_pairs_old_index_with_new_bin(tmp_path, monkeypatch):
    """The old .idx goes first and the new .idx comes last: a crash in between leaves no index at all."""
    write(tmp_path / "d", DOCS, np.uint16)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    writer = IndexedDatasetWriter(tmp_path / "d", np.uint16)
    writer.add_document(np.arange(3))
    with pytest.raises(OSError, match="simulated crash"):
        writer.finalize()
    with pytest.raises(FileNotFoundError, match=r"indexed dataset file not found: .*d\.idx"):
        IndexedDataset(tmp_path / "d")


def test_killed_process_leaves_no_complete_dataset(tmp_path):
    script = (
        "import os, sys, numpy as np\n"
        "from megamath.data.indexed_dataset_writer import IndexedDatasetWriter\n"
        "w = IndexedDatasetWriter(sys.argv[1], np.uint16)\n"
        "w.add_documents(np.arange(1000) % 500, np.full(10, 100))\n"
        "os._exit(9)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "d")], timeout=120)
    assert result.returncode == 9
    assert not (tmp_path / "d.bin").exists() and not (tmp_path / "d.idx").exists()
    with pytest.raises(FileNotFoundError, match="indexed dataset file not found"):
        IndexedDataset(tmp_path / "d")


def test_writer_is_single_use(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "d", np.uint16)
    writer.finalize()
    with pytest.raises(ValueError, match=r"writer for .*d is already finalized"):
        writer.add_document(np.arange(3))
    writer = IndexedDatasetWriter(tmp_path / "e", np.uint16)
    writer.abort()
    with pytest.raises(ValueError, match=r"writer for .*e is already aborted"):
        writer.finalize()
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
