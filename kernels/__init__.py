"""Triton kernels of lowbit, installed as ``lowbit.kernels`` (the Triton backend adds them)."""
