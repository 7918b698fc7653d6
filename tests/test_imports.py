"""Imports run one way: no cycle among megamath's modules (lazy imports count), the kernels import nothing of
megamath, and parsing a training config loads neither Triton nor the kernels."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_files() -> dict[str, Path]:
    """megamath's modules by dotted name; kernels/ is installed as megamath.kernels."""
    files = {}
    for root, package in ((REPO / "megamath", "megamath"), (REPO / "kernels", "megamath.kernels")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The megamath modules that `name` imports anywhere in its file (function bodies included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def test_no_import_cycles():
    g = graph()
    assert len(g) > 40 and "megamath.model.llama" in g["megamath.training.loop"]  # the walk sees real edges
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    g = graph()
    g["megamath.model.partition"] = g["megamath.model.partition"] | {"megamath.training.loop"}
    assert find_cycle(g) is not None


def test_kernels_import_nothing_of_megamath():
    for name, deps in graph().items():
        if name.startswith("megamath.kernels"):
            assert all(d.startswith("megamath.kernels") for d in deps), f"{name} imports {deps}"


def assert_runs(code: str) -> None:
    """Run code in a fresh interpreter (nothing imported yet) and require it to succeed."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _root_before_site_packages(path: list[str], cwd: str) -> bool:
    entries = [Path(cwd, entry).resolve() for entry in path]
    site = min(i for i, entry in enumerate(entries) if entry.name in ("site-packages", "dist-packages"))
    return REPO in entries[:site]


def test_the_checkout_root_never_comes_before_site_packages():
    # There kernels/ shadows the package named kernels that transformers >= 5.25 imports: tests/conftest.py
    # removes the root, and the tools that run from a checkout without installing append it.
    assert not _root_before_site_packages(sys.path, os.getcwd())
    for tool in ("preprocess_data", "reshard_checkpoint"):
        path = str(REPO / "tools" / f"{tool}.py")
        code = f"import json, runpy, sys; runpy.run_path({path!r}); print(json.dumps(sys.path))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
        assert out.returncode == 0, out.stderr[-2000:]
        assert not _root_before_site_packages(json.loads(out.stdout), "/"), tool


def test_parsing_a_training_config_imports_no_triton():
    """Run with Triton made unimportable, as on a machine without it."""
    code = (
        "import sys\n"
        "class NoTriton:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton is blocked by this test')\n"
        "sys.meta_path.insert(0, NoTriton())\n"
        "import megamath.training.config as c\n"
        "c.TrainConfig\n"
        "assert not any(m == 'triton' or m.startswith('megamath.kernels') for m in sys.modules), sorted(sys.modules)\n"
    )
    assert_runs(code)


def test_the_training_path_needs_no_zstandard():
    """Training, its evaluation and the GPU benchmarks import no compression library: zstandard is needed to
    read or write .jsonl.zst corpora only, and a GPU image may lack it (the one the GPU check runs on does)."""
    code = (
        "import sys\n"
        "sys.modules['zstandard'] = None  # import zstandard now raises ImportError\n"
        "import megamath.training.loop, megamath.commands.train, megamath.evaluation.during_training\n"
        "import megamath.data.indexed_dataset_writer  # perf/gpu_train_case.py writes its corpus with it\n"
    )
    assert_runs(code)


def test_files_stay_small_or_say_why():
    """A file past ~400 lines usually holds two jobs; one that does not says so in a "Why one file:" line."""
    for path in (REPO / "megamath").rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 420:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert "Why one file:" in doc, f"{path.relative_to(REPO)} has {len(text.splitlines())} lines"


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_gather_single",
               "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "barrier",
               "send", "recv", "all_to_all", "gather", "scatter"}


def test_every_collective_goes_through_mappings():
    """torch.distributed's collectives are called in parallel/mappings.py only, so a reader finds them all."""
    offenders = []
    for name, path in module_files().items():
        if name == "megamath.parallel.mappings" or name.startswith("megamath.kernels"):
            continue  # the kernels are a separate package that imports nothing of megamath
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and isinstance(node.value, ast.Name)
                    and node.value.id == "dist"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} dist.{node.attr}")
    assert offenders == []


LAYERS = {  # a package may import from the ones listed, never the other way round
    "megamath.data": (),
    "megamath.parallel": (),
    "megamath.model": ("megamath.parallel",),
    "megamath.training": ("megamath.data", "megamath.model", "megamath.parallel", "megamath.evaluation",
                          "megamath.generation"),
}


def test_model_parallel_and_training_import_one_way():
    inner = set(LAYERS)
    for name, deps in graph().items():
        package = next((p for p in LAYERS if name == p or name.startswith(p + ".")), None)
        if package is None:
            continue
        for dep in deps:
            target = next((p for p in inner if dep == p or dep.startswith(p + ".")), None)
            assert target in (None, package, *LAYERS[package]), f"{name} imports {dep}"
