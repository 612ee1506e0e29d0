"""Pure numerical QSM modules (numpy/scipy/torch only; no nipype, no file I/O).

One subpackage per pipeline stage: :mod:`.field` (phase -> total field), :mod:`.mask`,
:mod:`.background` (total -> local field), :mod:`.inversion` (local field -> susceptibility),
:mod:`.network` (the Meta-QSM networks and their inference), over :mod:`.core` (physics, dipole
kernel, FFT boxes, SMV kernels, solvers). Every import points down: the stages import core, not
each other, except network inference, which takes TKD from :mod:`.inversion.tkd`, and the
inversion registry, which names the networks; a stage's registry imports its methods, never the
reverse (tests/test_imports.py checks it). Nothing here imports interfaces/, workflows/ or cli/.

Conventions shared by every module here:

* arrays are indexed in voxel space ``(i, j, k)`` as stored in the NIfTI file;
* ``voxel_size_mm`` is the length of each voxel axis in mm, ``(di, dj, dk)``;
* ``b0_dir`` is the unit vector of the main field expressed in voxel axes
  (see :func:`metaqsm_bids.qsm.core.physics.b0_direction_voxel`);
* fields are in Hz (``*_hz``) or ppm of B0 (``*_ppm``), phases in rad, times in s,
  susceptibility in ppm;
* positive phase means positive frequency offset: ``phase = 2*pi*field_hz*TE``;
* FFTs use scipy.fft's default worker count, so callers choose the threads with
  ``scipy.fft.set_workers(n)`` (the nipype interfaces do, per node).
"""
