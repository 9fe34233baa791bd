"""Evaluation of a trained dictionary: reconstruction, sparsity and causal metrics.

Kept free of imports: what it imported would count as code every stage using the folder depends on.
"""
