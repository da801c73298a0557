"""masknorm.spec: the symbolic definition of masked normalization and its derived closed forms.

Importing this package imports no sympy; `masknorm.spec.closed_forms` is plain Python generated
by `masknorm derive` and usable on floats, mpmath numbers and torch tensors alike.
"""
