"""Efficient-inference methods, one file per paper; see methods/base.py for the contract."""
