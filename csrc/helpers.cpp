// Dataset index helpers (placeholder until the sample-index and blending helpers land).
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_helpers, m) { m.doc() = "megamath dataset index helpers"; }
