"""Command-line entry points: ``metaqsm``, ``metaqsm-simulate``, ``metaqsm-train``."""
