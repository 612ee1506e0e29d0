"""Shared low-level pieces below every stage: physics constants and geometry, the dipole kernel,
FFT boxes, SMV kernels and iterative-solver pieces. Imports nothing from the stages."""
