// Word n-gram hashing for the train/test overlap check (`megamath overlap`).
//
// Words are what Python's `str.split()` (no argument) returns: maximal runs of characters that are not
// whitespace in Python's sense (`str.isspace()`), read here from UTF-8 bytes. The 29 whitespace code
// points are ASCII \t \n \v \f \r, \x1c-\x1f and space, plus U+0085, U+00A0, U+1680, U+2000-U+200A,
// U+2028, U+2029, U+202F, U+205F and U+3000; tests check the split against `str.split()` on every one.
//
// An n-gram's key is a polynomial rolling hash (mod 2^64) of its n word hashes, mixed with n: one
// multiply-add per word and n-gram length, whatever n is. Keys only nominate candidates; the caller
// compares the real n-gram text with the test n-grams, so a collision can cost time, never a false hit.
//
// The boundary is thin: bytes and int64/uint64 arrays in, arrays out, the GIL released while scanning.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <vector>

namespace py = pybind11;

namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using UInt64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;
constexpr uint64_t kFnvPrime = 0x100000001b3ULL;
constexpr uint64_t kBase = 0x9e3779b97f4a7c15ULL;  // odd: invertible mod 2^64

inline uint64_t mix64(uint64_t x) {  // splitmix64's finaliser: every input bit moves every output bit
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Length in bytes of the whitespace character starting at p (0 when it is not whitespace).
inline int whitespace_at(const unsigned char* p, const unsigned char* end) {
  const unsigned char c = p[0];
  if (c < 0x80) return (c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f)) ? 1 : 0;
  if (c == 0xc2) return (p + 1 < end && (p[1] == 0x85 || p[1] == 0xa0)) ? 2 : 0;
  if (c < 0xe1 || c > 0xe3 || p + 2 >= end) return 0;
  const unsigned char c1 = p[1], c2 = p[2];
  if (c == 0xe1) return (c1 == 0x9a && c2 == 0x80) ? 3 : 0;                        // U+1680
  if (c == 0xe3) return (c1 == 0x80 && c2 == 0x80) ? 3 : 0;                        // U+3000
  if (c1 == 0x80) return (c2 <= 0x8a || c2 == 0xa8 || c2 == 0xa9 || c2 == 0xaf) ? 3 : 0;  // U+2000-200A, 2028, 2029, 202F
  return (c1 == 0x81 && c2 == 0x9f) ? 3 : 0;                                       // U+205F
}

struct Word {
  uint64_t hash;
  int64_t start, end;  // byte offsets in the buffer
};

// Byte classes: 0 inside a word, 1 ASCII whitespace, 2 the lead byte of a character that may be Unicode
// whitespace (C2, E1, E2, E3: decided by whitespace_at). Most bytes are class 0, one table load each.
struct ByteClasses {
  unsigned char of[256];
  ByteClasses() {
    for (int c = 0; c < 256; ++c) {
      const unsigned char b = static_cast<unsigned char>(c);
      of[c] = (c < 0x80 && whitespace_at(&b, &b + 1)) ? 1 : (c == 0xc2 || (c >= 0xe1 && c <= 0xe3)) ? 2 : 0;
    }
  }
};

// A word's bytes, 8 at a time (one multiply per 8 bytes, not per byte), mixed with its length.
inline uint64_t hash_bytes(const unsigned char* p, int64_t len) {
  uint64_t h = kFnvOffset ^ static_cast<uint64_t>(len) * kFnvPrime;
  for (; len >= 8; p += 8, len -= 8) {
    uint64_t x;
    std::memcpy(&x, p, 8);
    h = (h ^ x) * 0xff51afd7ed558ccdULL;
    h ^= h >> 32;
  }
  if (len > 0) {
    uint64_t x = 0;
    std::memcpy(&x, p, static_cast<size_t>(len));
    h = (h ^ x) * 0xff51afd7ed558ccdULL;
  }
  return mix64(h);
}

// The words of data[begin:end] with their hashes, appended to `words` (cleared first).
void split_words(const unsigned char* data, int64_t begin, int64_t end, std::vector<Word>& words) {
  static const ByteClasses classes;
  words.clear();
  const unsigned char* p = data + begin;
  const unsigned char* stop = data + end;
  while (p < stop) {
    while (p < stop) {  // whitespace
      const unsigned char c = classes.of[*p];
      if (c == 0) break;
      if (c == 1) {
        ++p;
        continue;
      }
      const int ws = whitespace_at(p, stop);
      if (ws == 0) break;
      p += ws;
    }
    if (p >= stop) break;
    const unsigned char* word = p;
    while (p < stop) {  // the word
      const unsigned char c = classes.of[*p];
      if (c == 0) {
        ++p;
        continue;
      }
      if (c == 1 || whitespace_at(p, stop) > 0) break;
      ++p;
    }
    words.push_back({hash_bytes(word, p - word), word - data, p - data});
  }
}

inline uint64_t ngram_key(uint64_t rolling, int64_t n) {
  const uint64_t key = mix64(rolling ^ (static_cast<uint64_t>(n) * 0xd6e8feb86659fd93ULL));
  return key ? key : 1;  // 0 marks an empty table slot
}

inline uint64_t power(uint64_t base, int64_t exponent) {  // by squaring: --n may be huge, it costs log n
  uint64_t result = 1;
  for (; exponent > 0; exponent >>= 1, base *= base)
    if (exponent & 1) result *= base;
  return result;
}

// Calls emit(key, first word index) for every n-gram of `words`.
template <typename Emit>
void for_each_ngram(const std::vector<Word>& words, int64_t n, uint64_t top_power, Emit&& emit) {
  const int64_t count = static_cast<int64_t>(words.size());
  if (count < n) return;
  uint64_t rolling = 0;
  for (int64_t i = 0; i < n; ++i) rolling = rolling * kBase + words[i].hash;
  emit(ngram_key(rolling, n), 0);
  for (int64_t i = n; i < count; ++i) {
    rolling = (rolling - words[i - n].hash * top_power) * kBase + words[i].hash;
    emit(ngram_key(rolling, n), i - n + 1);
  }
}

void check_inputs(const py::bytes& data, const Int64Array& offsets, const Int64Array& ns, std::string_view& view) {
  view = std::string_view(data);
  if (offsets.ndim() != 1 || offsets.shape(0) < 1) throw std::invalid_argument("offsets must be 1-D, at least 1 long");
  if (ns.ndim() != 1) throw std::invalid_argument("ns must be 1-D");
  const int64_t* off = offsets.data();
  for (py::ssize_t d = 0; d + 1 < offsets.shape(0); ++d)
    if (off[d] < 0 || off[d] > off[d + 1]) throw std::invalid_argument("offsets must be non-decreasing from 0");
  if (off[offsets.shape(0) - 1] > static_cast<int64_t>(view.size()))
    throw std::invalid_argument("offsets run past the end of data");
  for (py::ssize_t i = 0; i < ns.shape(0); ++i)
    if (ns.data()[i] < 1) throw std::invalid_argument("n must be at least 1");
}

// Every n-gram of every document: documents are data[offsets[d]:offsets[d + 1]].
// returns (key uint64, which n int64, doc int64, start byte, end byte), each (count,)
py::tuple ngram_keys(const py::bytes& data, const Int64Array& offsets, const Int64Array& ns) {
  std::string_view view;
  check_inputs(data, offsets, ns, view);
  const auto* bytes = reinterpret_cast<const unsigned char*>(view.data());
  std::vector<uint64_t> keys;
  std::vector<int64_t> which, docs, starts, ends;
  std::vector<Word> words;
  for (py::ssize_t d = 0; d + 1 < offsets.shape(0); ++d) {
    split_words(bytes, offsets.data()[d], offsets.data()[d + 1], words);
    for (py::ssize_t j = 0; j < ns.shape(0); ++j) {
      const int64_t n = ns.data()[j];
      for_each_ngram(words, n, power(kBase, n - 1), [&](uint64_t key, int64_t i) {
        keys.push_back(key);
        which.push_back(j);
        docs.push_back(d);
        starts.push_back(words[i].start);
        ends.push_back(words[i + n - 1].end);
      });
    }
  }
  return py::make_tuple(py::array_t<uint64_t>(keys.size(), keys.data()), py::array_t<int64_t>(which.size(), which.data()),
                        py::array_t<int64_t>(docs.size(), docs.data()), py::array_t<int64_t>(starts.size(), starts.data()),
                        py::array_t<int64_t>(ends.size(), ends.data()));
}

// Open-addressing set of keys (linear probing, power-of-two size, at most 1/4 full, 0 = empty).
py::array_t<uint64_t> build_key_table(const UInt64Array& keys) {
  if (keys.ndim() != 1) throw std::invalid_argument("keys must be 1-D");
  size_t size = 16;
  while (size < 4 * static_cast<size_t>(keys.shape(0))) size *= 2;
  py::array_t<uint64_t> table(size);
  uint64_t* slots = table.mutable_data();
  std::fill(slots, slots + size, 0);
  for (py::ssize_t i = 0; i < keys.shape(0); ++i) {
    const uint64_t key = keys.data()[i];
    if (key == 0) throw std::invalid_argument("key 0 is reserved for empty slots");
    size_t s = key & (size - 1);
    while (slots[s] != 0 && slots[s] != key) s = (s + 1) & (size - 1);
    slots[s] = key;
  }
  return table;
}

inline bool table_has(const uint64_t* slots, size_t mask, uint64_t key) {
  for (size_t s = key & mask;; s = (s + 1) & mask) {
    if (slots[s] == key) return true;
    if (slots[s] == 0) return false;
  }
}

// The n-grams of the documents whose key is in `table` (from build_key_table): candidates only.
// returns (which n int64, doc int64, start byte, end byte), each (candidates,)
py::tuple scan_candidates(const py::bytes& data, const Int64Array& offsets, const Int64Array& ns,
                          const UInt64Array& table) {
  std::string_view view;
  check_inputs(data, offsets, ns, view);
  const size_t size = static_cast<size_t>(table.shape(0));
  if (table.ndim() != 1 || size == 0 || (size & (size - 1)) != 0)
    throw std::invalid_argument("table must be 1-D with a power-of-two size (use build_key_table)");
  const auto* bytes = reinterpret_cast<const unsigned char*>(view.data());
  const uint64_t* slots = table.data();
  std::vector<int64_t> which, docs, starts, ends;
  {
    py::gil_scoped_release release;
    std::vector<Word> words;
    std::vector<uint64_t> powers(ns.shape(0));
    for (py::ssize_t j = 0; j < ns.shape(0); ++j) powers[j] = power(kBase, ns.data()[j] - 1);
    for (py::ssize_t d = 0; d + 1 < offsets.shape(0); ++d) {
      split_words(bytes, offsets.data()[d], offsets.data()[d + 1], words);
      for (py::ssize_t j = 0; j < ns.shape(0); ++j) {
        const int64_t n = ns.data()[j];
        for_each_ngram(words, n, powers[j], [&](uint64_t key, int64_t i) {
          if (!table_has(slots, size - 1, key)) return;
          which.push_back(j);
          docs.push_back(d);
          starts.push_back(words[i].start);
          ends.push_back(words[i + n - 1].end);
        });
      }
    }
  }
  return py::make_tuple(py::array_t<int64_t>(which.size(), which.data()), py::array_t<int64_t>(docs.size(), docs.data()),
                        py::array_t<int64_t>(starts.size(), starts.data()), py::array_t<int64_t>(ends.size(), ends.data()));
}

// Word boundaries as (start, end) byte pairs: lets tests compare the split with Python's str.split().
py::array_t<int64_t> word_spans(const py::bytes& data) {
  const std::string_view view(data);
  std::vector<Word> words;
  split_words(reinterpret_cast<const unsigned char*>(view.data()), 0, static_cast<int64_t>(view.size()), words);
  py::array_t<int64_t> spans({static_cast<py::ssize_t>(words.size()), static_cast<py::ssize_t>(2)});
  auto out = spans.mutable_unchecked<2>();
  for (size_t i = 0; i < words.size(); ++i) {
    out(i, 0) = words[i].start;
    out(i, 1) = words[i].end;
  }
  return spans;
}

}  // namespace

void register_ngram_overlap(py::module_& m) {
  m.def("ngram_keys", &ngram_keys, py::arg("data"), py::arg("offsets"), py::arg("ns"),
        "Keys of every word n-gram of data[offsets[d]:offsets[d+1]] for each n in ns: (key, which n, doc, start, end).");
  m.def("build_key_table", &build_key_table, py::arg("keys"), "Open-addressing set of n-gram keys for scan_candidates.");
  m.def("scan_candidates", &scan_candidates, py::arg("data"), py::arg("offsets"), py::arg("ns"), py::arg("table"),
        "Byte spans of the n-grams whose key is in table: (which n, doc, start, end).");
  m.def("word_spans", &word_spans, py::arg("data"), "(words, 2) byte spans of the words of UTF-8 data, as str.split() cuts.");
}
