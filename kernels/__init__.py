"""Triton kernels with autograd wrappers and a plain-torch reference (`<op>_ref`) beside each.

Installed as `megamath.kernels`; imports nothing else of megamath.
"""
