"""Make Triton's CPU interpreter skip a repeated scan that costs a third of every kernel test's time.

Before each kernel launch, and again on every call of a nested `@triton.jit` function (our `cast_rne`,
Triton's own `tl.zeros`, ...), the interpreter re-patches triton.language: its `_patch_builtin` runs
`inspect.getmembers` over `tl`, `tl.core`, `tl.tensor` and `tl.math` (hundreds of members, sorted) just to
find the builtins to wrap. An RMSNorm backward program calls `cast_rne` twice per row, so in
test_convergence.py that scan was ~35% of the kernels' run time.

`install()` replaces `_patch_builtin` with one that remembers, per module or class, the *names* found
the first time and then does exactly what the original does for each of them: read the current member,
and wrap it only if it is a builtin. The names a package exports do not change while the tests run, so
the interpreter patches the same members with the same wrappers and the kernels compute the same values
(the convergence run's 50 losses are bit-identical with and without it). It touches nothing when the
Triton in use has no such function (another version), so the worst case is the old speed.

It also skips a nested call's repeat of patches its launch already made (`_skip_repeated_nested_patches`) and
caches the numpy dtype of each Triton type (`_cache_numpy_dtypes`): together ~10-20 % of a kernel test's time,
and the kernels' outputs (flash attention, RMSNorm, cross-entropy, embedding gradient in bf16 and fp16; a model's
weights after 4 AdamW steps) are bit-identical with and without them.
"""
from __future__ import annotations

import inspect


def install() -> bool:
    """Patch the interpreter's builtin scan if this Triton has the one we know; True when installed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_builtin", None)
    if original is None or getattr(original, "_names_cached", False) or not hasattr(interpreter, "_patch_attr"):
        return False
    if list(inspect.signature(original).parameters) != ["pkg", "builder", "scope"]:
        return False
    is_builtin = tl.core.is_builtin
    names_of = {}  # package (module or class) -> names of its builtin members, found once

    def patch_builtin(pkg, builder, scope):
        names = names_of.get(pkg)
        if names is None:
            names = names_of[pkg] = [name for name, member in inspect.getmembers(pkg) if is_builtin(member)]
        for name in names:
            member = getattr(pkg, name)
            if is_builtin(member):  # already wrapped (a nested call inside a launch): left as it is, as before
                interpreter._patch_attr(pkg, name, member, builder, scope)

    patch_builtin._names_cached = True
    interpreter._patch_builtin = patch_builtin
    _skip_repeated_nested_patches(interpreter, tl)
    _cache_numpy_dtypes(interpreter, tl)
    return True


def _cache_numpy_dtypes(interpreter, tl) -> None:
    """Look up the numpy dtype of a Triton scalar type once, not by a dict built afresh on every call.

    `_get_np_dtype` builds a 19-entry dict of Triton types (each hashed) on each of its calls, several per
    operation of a program. The answer depends only on the element type's name for a plain scalar type, or a
    block of one, which a dtype's equality compares; pointers and anything else still go to the original.
    """
    original = getattr(interpreter, "_get_np_dtype", None)
    if original is None or getattr(original, "_cached", False):
        return
    by_name = {}  # element type name -> numpy dtype

    def get_np_dtype(tt_dtype):
        element = tt_dtype.element_ty if type(tt_dtype) is tl.block_type else tt_dtype
        if type(element) is not tl.dtype:  # a pointer (or a block of them), or a type we do not know
            return original(tt_dtype)
        np_dtype = by_name.get(element.name)
        if np_dtype is None:
            np_dtype = by_name[element.name] = original(element)  # the original's KeyError, uncached, if unknown
        return np_dtype

    get_np_dtype._cached = True
    interpreter._get_np_dtype = get_np_dtype


def _skip_repeated_nested_patches(interpreter, tl) -> None:
    """Inside one launch, patch a set of `triton.language` modules once, not again on every nested call.

    Each call of a nested `@triton.jit` function (`cast_rne`, `tl.sum`, ...) runs `_patch_lang` again: the
    builtin scan above (the members are wrapped already, so it wraps nothing) and a re-set of the same
    attributes (`range`, `reduce`, `tensor.__bool__`, ...) to fresh closures of the same code, which hold no
    state. Repeating a call this launch has made for the same modules changes nothing a kernel can see, so it
    is skipped (a quarter of an RMSNorm program's time). The launch's own call and the first nested call for
    each other module set still run, in every launch, so what is patched, and what stays patched after a
    launch, is what it was.
    """
    if not all(hasattr(interpreter, name) for name in ("_patch_lang", "_LangPatchScope", "GridExecutor")):
        return  # another Triton: the old speed
    original = interpreter._patch_lang
    if getattr(original, "_repeats_skipped", False):
        return
    lang_modules = (tl, tl.core)
    launch = {"running": False, "patched": set()}  # the modules patched so far in the launch under way
    langs_of = {}  # (function, size of its globals) -> ids of the language modules among them

    def patch_lang(fn):
        key = fn, len(fn.__globals__)  # the rewrite adds the interpreter's globals to a kernel module's
        langs = langs_of.get(key)
        if langs is None:
            langs = langs_of[key] = frozenset(id(value) for value in fn.__globals__.values()
                                              if any(value is lang for lang in lang_modules))
        if launch["running"] and langs and langs <= launch["patched"]:
            return interpreter._LangPatchScope()  # sets nothing (a nested call drops its scope unrestored)
        scope = original(fn)
        if launch["running"]:
            launch["patched"] |= langs
        return scope

    grid_call = interpreter.GridExecutor.__call__

    def call_grid(self, *args, **kwargs):
        outer = dict(launch)
        launch.update(running=True, patched=set())  # the launch's own _patch_lang runs in full, first
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launch.update(outer)

    patch_lang._repeats_skipped = True
    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = call_grid
