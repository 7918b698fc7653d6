// Pull one string field out of a batch of JSON lines, unescaped to UTF-8: the fast path of the overlap scan.
//
// Python's json.loads costs more per byte than the whole n-gram scan, and the scan needs only one field
// of each record. This parser is strict and gives up rather than guess: it answers ok=false for the whole
// batch when any line is not plainly valid (invalid UTF-8 anywhere, a JSON syntax error, NaN/Infinity,
// a raw control character in a string, a blank line, a top-level value that is not an object, the key
// missing, written with escapes or twice, its value not a string, empty, or holding a lone surrogate
// escape). The caller then parses that batch with Python (`megamath.data.sources.parse_lines`), which
// reports each bad line; so whenever ok=true the texts are exactly `json.loads(line)[key]` of every line,
// and tests compare the two on fuzzed lines.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace py = pybind11;

namespace {

// Strict UTF-8 (what Python's decoder accepts): no overlongs, no encoded surrogates, nothing past U+10FFFF.
bool valid_utf8(const unsigned char* p, const unsigned char* end) {
  while (p < end) {
    if (end - p >= 8) {  // 8 ASCII bytes at a time: most of a math corpus
      uint64_t chunk;
      std::memcpy(&chunk, p, 8);
      if ((chunk & 0x8080808080808080ULL) == 0) {
        p += 8;
        continue;
      }
    }
    const unsigned char c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    int extra;
    uint32_t min;
    if (c >= 0xc2 && c <= 0xdf) extra = 1, min = 0x80;
    else if (c >= 0xe0 && c <= 0xef) extra = 2, min = 0x800;
    else if (c >= 0xf0 && c <= 0xf4) extra = 3, min = 0x10000;
    else return false;
    if (end - p <= extra) return false;
    uint32_t cp = c & (0x3f >> extra);
    for (int i = 1; i <= extra; ++i) {
      if ((p[i] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    p += extra + 1;
  }
  return true;
}

struct Parser {
  const unsigned char* p;
  const unsigned char* end;
  int depth = 0;
  std::string name_;

  void skip_ws() {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p;
  }

  static int hex(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  bool read_u16(uint32_t& out) {  // the 4 hex digits after \u
    if (end - p < 4) return false;
    out = 0;
    for (int i = 0; i < 4; ++i) {
      const int h = hex(p[i]);
      if (h < 0) return false;
      out = (out << 4) | static_cast<uint32_t>(h);
    }
    p += 4;
    return true;
  }

  static void put_utf8(uint32_t cp, std::string& out) {
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out.push_back(static_cast<char>(0xc0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
      out.push_back(static_cast<char>(0xe0 | (cp >> 12)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    } else {
      out.push_back(static_cast<char>(0xf0 | (cp >> 18)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    }
  }

  // A string at p (on its opening quote). With `out`, its unescaped UTF-8 is appended and a lone
  // surrogate escape fails; without, it is only checked. `escaped` tells whether it had any escape.
  bool string(std::string* out, bool& escaped) {
    ++p;  // the quote
    escaped = false;
    while (p < end) {
      const unsigned char* run = p;
      while (end - p >= 8) {  // 8 bytes at a time while none is a quote, a backslash or a control char
        constexpr uint64_t kOnes = 0x0101010101010101ULL, kHighs = 0x8080808080808080ULL;
        uint64_t x;
        std::memcpy(&x, p, 8);
        const uint64_t quote = x ^ (kOnes * '"'), backslash = x ^ (kOnes * '\\');
        const uint64_t special = ((quote - kOnes) & ~quote) | ((backslash - kOnes) & ~backslash) |
                                 ((x - kOnes * 0x20) & ~x);  // some byte == '"', == '\\' or < 0x20
        if (special & kHighs) break;
        p += 8;
      }
      while (p < end && *p != '"' && *p != '\\' && *p >= 0x20) ++p;
      if (out) out->append(reinterpret_cast<const char*>(run), p - run);
      if (p >= end || *p < 0x20) return false;  // unterminated, or a raw control character
      if (*p == '"') {
        ++p;
        return true;
      }
      escaped = true;
      if (++p >= end) return false;
      const unsigned char e = *p++;
      char simple = 0;
      switch (e) {
        case '"': simple = '"'; break;
        case '\\': simple = '\\'; break;
        case '/': simple = '/'; break;
        case 'b': simple = '\b'; break;
        case 'f': simple = '\f'; break;
        case 'n': simple = '\n'; break;
        case 'r': simple = '\r'; break;
        case 't': simple = '\t'; break;
        case 'u': {
          uint32_t cp;
          if (!read_u16(cp)) return false;
          if (cp >= 0xd800 && cp <= 0xdbff && end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
            const unsigned char* save = p;
            p += 2;
            uint32_t low;
            if (!read_u16(low)) return false;
            if (low >= 0xdc00 && low <= 0xdfff) cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
            else p = save;  // a high surrogate alone: the next escape is read on its own
          }
          if (cp >= 0xd800 && cp <= 0xdfff && out) return false;  // lone surrogate in the text
          if (out) put_utf8(cp, *out);
          continue;
        }
        default: return false;
      }
      if (out) out->push_back(simple);
    }
    return false;
  }

  bool number() {
    if (p < end && *p == '-') ++p;
    if (p >= end) return false;
    if (*p == '0') ++p;
    else if (*p >= '1' && *p <= '9') while (p < end && *p >= '0' && *p <= '9') ++p;
    else return false;
    if (p < end && *p == '.') {
      ++p;
      if (p >= end || *p < '0' || *p > '9') return false;
      while (p < end && *p >= '0' && *p <= '9') ++p;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
      ++p;
      if (p < end && (*p == '+' || *p == '-')) ++p;
      if (p >= end || *p < '0' || *p > '9') return false;
      while (p < end && *p >= '0' && *p <= '9') ++p;
    }
    return true;
  }

  bool literal(std::string_view word) {
    if (static_cast<size_t>(end - p) < word.size() || std::string_view(reinterpret_cast<const char*>(p), word.size()) != word)
      return false;
    p += word.size();
    return true;
  }

  bool value() {  // any JSON value, skipped
    skip_ws();
    if (p >= end) return false;
    bool escaped;
    switch (*p) {
      case '"': return string(nullptr, escaped);
      case '{': return container('}');
      case '[': return container(']');
      case 't': return literal("true");
      case 'f': return literal("false");
      case 'n': return literal("null");
      default: return number();
    }
  }

  bool container(unsigned char close) {
    if (++depth > 200) return false;
    ++p;
    skip_ws();
    if (p < end && *p == close) {
      ++p;
      --depth;
      return true;
    }
    while (true) {
      if (close == '}') {
        skip_ws();
        bool escaped;
        if (p >= end || *p != '"' || !string(nullptr, escaped)) return false;
        skip_ws();
        if (p >= end || *p++ != ':') return false;
      }
      if (!value()) return false;
      skip_ws();
      if (p >= end) return false;
      if (*p == ',') {
        ++p;
        continue;
      }
      if (*p++ != close) return false;
      --depth;
      return true;
    }
  }

  // The top-level object of a line; appends the value of `key` to out. False when the line is not
  // plainly valid or the key is not there exactly once as a non-empty string.
  bool record(std::string_view key, std::string& out) {
    skip_ws();
    if (p >= end || *p != '{') return false;
    ++p;
    int found = 0;
    skip_ws();
    if (p < end && *p == '}') return false;  // {} has no key
    while (true) {
      skip_ws();
      if (p >= end || *p != '"') return false;
      name_.clear();  // the key unescaped ("t\u0065xt" is "text"); a lone surrogate in it gives up
      bool escaped;
      if (!string(&name_, escaped)) return false;
      skip_ws();
      if (p >= end || *p++ != ':') return false;
      skip_ws();
      if (name_ == key) {
        if (++found > 1 || p >= end || *p != '"') return false;
        const size_t before = out.size();
        if (!string(&out, escaped) || out.size() == before) return false;
      } else if (!value()) {
        return false;
      }
      skip_ws();
      if (p >= end) return false;
      if (*p == ',') {
        ++p;
        continue;
      }
      if (*p++ != '}') return false;
      skip_ws();
      return p == end && found == 1;
    }
  }
};

// (ok, texts as UTF-8 back to back, (lines + 1,) int64 offsets): see the file comment.
py::tuple extract_json_field(const py::bytes& data, const std::string& key) {
  const std::string_view view(data);
  const auto* begin = reinterpret_cast<const unsigned char*>(view.data());
  const auto* stop = begin + view.size();
  std::string out;
  std::vector<int64_t> offsets{0};
  bool ok;
  {
    py::gil_scoped_release release;
    out.reserve(view.size());
    ok = valid_utf8(begin, stop);
    const unsigned char* line = begin;
    while (ok && line < stop) {
      const void* newline = std::memchr(line, '\n', static_cast<size_t>(stop - line));
      const unsigned char* eol = newline ? static_cast<const unsigned char*>(newline) : stop;
      Parser parser{line, eol};
      ok = parser.record(key, out);
      offsets.push_back(static_cast<int64_t>(out.size()));
      line = eol + 1;  // past the newline; the batch's final newline ends the loop
    }
  }
  if (!ok) return py::make_tuple(false, py::bytes(), py::array_t<int64_t>(0));
  return py::make_tuple(true, py::bytes(out), py::array_t<int64_t>(offsets.size(), offsets.data()));
}

}  // namespace

void register_jsonl_text(py::module_& m) {
  m.def("extract_json_field", &extract_json_field, py::arg("data"), py::arg("key"),
        "(ok, UTF-8 texts back to back, int64 offsets) of data's JSON lines' `key`; ok=false: parse in Python.");
}
