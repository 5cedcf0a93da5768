"""Chaos suite: the real parts as OS processes, faults injected, invariants checked from outside."""
