"""Sparse dictionaries: weights and their layouts (dictionary.py) and the registry of activations.

Kept free of imports: what it imported would count as code every stage using the folder depends on.
"""
