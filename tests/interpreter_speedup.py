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
    return True
