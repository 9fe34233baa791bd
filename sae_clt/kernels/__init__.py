"""Compiled CPU kernels (C++ in kernels.cpp, built on first use) and their torch fallbacks (ops.py).

Kept free of imports: what it imported would count as code every stage using the folder depends on.
"""
