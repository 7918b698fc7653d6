// Dataset index helpers: the two loops of the data path that run once per training sample.
//
// At ProofPile II scale (10M documents, 55B tokens, seq_length 4096) the sample index has ~13M rows
// and a blend of many datasets decides ~10M samples; a Python loop over either takes minutes, a
// plain C++ loop well under a second. Both functions have numpy references beside their Python
// wrappers (megamath/data/sample_index.py, megamath/data/blending.py) and must equal them exactly.
//
// The boundary is thin on purpose: arrays in, arrays out, inputs checked here (std::invalid_argument
// becomes ValueError), the GIL released while the loop runs so other threads (e.g. a data loader)
// keep going.
//
// The same module also holds the overlap scan's functions (csrc/ngram_overlap.cpp, csrc/jsonl_text.cpp),
// registered by the PYBIND11_MODULE at the end of this file.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using Int32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using Float64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Row k of the sample index is where global token k * seq_length lies in the concatenation of the
// documents in doc_idx order: (position j in doc_idx, offset within document doc_idx[j]). Sample k
// is tokens [k * seq_length, (k + 1) * seq_length] inclusive, i.e. rows k and k + 1, so consecutive
// samples share one boundary token. Zero-length documents hold no token, so no row points into one.
//
// sizes:   (n_sequences,) int32 tokens per sequence
// doc_idx: (n_docs,) int64 sequence ids in reading order (all epochs)
// returns: (num_samples + 1, 2) int64
py::array_t<int64_t> build_sample_index(const Int32Array& sizes, const Int64Array& doc_idx,
                                        int64_t seq_length, int64_t num_samples) {
  if (sizes.ndim() != 1) throw std::invalid_argument("sizes must be 1-D");
  if (doc_idx.ndim() != 1) throw std::invalid_argument("doc_idx must be 1-D");
  if (seq_length < 1) {
    throw std::invalid_argument("seq_length must be >= 1, got " + std::to_string(seq_length));
  }
  if (num_samples < 0) {
    throw std::invalid_argument("num_samples must be >= 0, got " + std::to_string(num_samples));
  }
  if (num_samples > std::numeric_limits<int64_t>::max() / seq_length - 1) {
    throw std::invalid_argument("num_samples * seq_length overflows int64");
  }
  const int64_t n_sequences = sizes.shape(0);
  const int64_t n_docs = doc_idx.shape(0);
  const int32_t* size_of = sizes.data();
  const int64_t* doc_ids = doc_idx.data();

  py::array_t<int64_t> out(std::vector<py::ssize_t>{num_samples + 1, 2});
  int64_t* rows = out.mutable_data();
  std::string error;
  {
    py::gil_scoped_release release;
    int64_t j = -1;         // current position in doc_idx
    int64_t doc_start = 0;  // global position of the first token of document doc_idx[j]
    int64_t doc_end = 0;    // one past its last token
    for (int64_t k = 0; k <= num_samples && error.empty(); ++k) {
      const int64_t pos = k * seq_length;
      while (doc_end <= pos) {  // skip to the document holding `pos` (empty ones included)
        ++j;
        if (j >= n_docs) {
          error = "doc_idx runs out of tokens: " + std::to_string(num_samples) + " samples of seq_length " +
                  std::to_string(seq_length) + " need " + std::to_string(num_samples * seq_length + 1) +
                  " tokens, doc_idx holds " + std::to_string(doc_end);
          break;
        }
        const int64_t doc = doc_ids[j];
        if (doc < 0 || doc >= n_sequences) {
          error = "doc_idx[" + std::to_string(j) + "] = " + std::to_string(doc) + " is outside [0, " +
                  std::to_string(n_sequences) + ")";
          break;
        }
        if (size_of[doc] < 0) {
          error = "sizes[" + std::to_string(doc) + "] is negative: " + std::to_string(size_of[doc]);
          break;
        }
        doc_start = doc_end;
        doc_end += size_of[doc];
      }
      if (!error.empty()) break;
      rows[2 * k] = j;
      rows[2 * k + 1] = pos - doc_start;
    }
  }
  if (!error.empty()) throw std::invalid_argument(error);
  return out;
}

// Greedy blending: sample i goes to the dataset furthest behind its target share,
// argmax_d weights[d] * t(i) - count[d], ties to the lowest index; dataset_sample_index[i] is
// how many samples that dataset had before. The target t(i) is i + 1 (the count once sample i is
// placed), or with `megatron_target` Megatron-LM's max(i, 1), which gives samples 0 and 1 one target.
// `weights` must already be normalized to sum 1 (the Python wrapper does it, so that this loop and
// the numpy reference see identical doubles).
//
// weights: (n_datasets,) float64
// returns: dataset_index (num_samples,) int16, dataset_sample_index (num_samples,) int64
py::tuple build_blending_indices(const Float64Array& weights, int64_t num_samples, bool megatron_target) {
  if (weights.ndim() != 1) throw std::invalid_argument("weights must be 1-D");
  const int64_t n_datasets = weights.shape(0);
  if (n_datasets < 1) throw std::invalid_argument("weights must name at least one dataset");
  if (n_datasets > std::numeric_limits<int16_t>::max()) {
    throw std::invalid_argument("at most 32767 datasets can be blended, got " + std::to_string(n_datasets));
  }
  if (num_samples <= 0) {
    throw std::invalid_argument("num_samples must be positive, got " + std::to_string(num_samples));
  }
  const double* w = weights.data();
  for (int64_t d = 0; d < n_datasets; ++d) {
    if (!std::isfinite(w[d]) || w[d] <= 0.0) {
      throw std::invalid_argument("weights must be finite and positive, weights[" + std::to_string(d) +
                                  "] = " + std::to_string(w[d]));
    }
  }
  py::array_t<int16_t> dataset_index(num_samples);
  py::array_t<int64_t> dataset_sample_index(num_samples);
  int16_t* which = dataset_index.mutable_data();
  int64_t* nth = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> count(n_datasets, 0);
    for (int64_t i = 0; i < num_samples; ++i) {
      const double target = megatron_target ? std::max(static_cast<double>(i), 1.0) : static_cast<double>(i + 1);
      int64_t best = 0;
      double best_error = w[0] * target - static_cast<double>(count[0]);
      for (int64_t d = 1; d < n_datasets; ++d) {
        const double error = w[d] * target - static_cast<double>(count[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      which[i] = static_cast<int16_t>(best);
      nth[i] = count[best]++;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

void register_ngram_overlap(py::module_& m);  // csrc/ngram_overlap.cpp
void register_jsonl_text(py::module_& m);      // csrc/jsonl_text.cpp

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "megamath C++ helpers (sample index, blending indices, n-gram overlap scan)";
  m.def("build_sample_index", &build_sample_index, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_samples"),
        "(num_samples + 1, 2) int64 rows (position in doc_idx, offset) of global tokens k * seq_length.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("num_samples"),
        py::arg("megatron_target") = false,
        "Greedy blend of normalized weights: (dataset_index int16, dataset_sample_index int64).");
  register_ngram_overlap(m);
  register_jsonl_text(m);
}
