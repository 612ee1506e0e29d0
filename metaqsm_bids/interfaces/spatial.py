"""Thin nipype interface around :func:`metaqsm_bids.spatial.template.to_template`."""
import os

from nipype.interfaces.base import BaseInterfaceInputSpec, Directory, SimpleInterface, TraitedSpec, traits

from ..spatial.template import to_template

#: Orig-space derivatives resampled to each template: kind (as WriteRunDerivatives names it) ->
#: (file-name tail, interpolation). Masks stay binary (nearest neighbour).
RESAMPLED = {
    "chimap": ("Chimap", "linear"),
    "qsm_mask": ("desc-qsm_mask", "nearest"),
    "brain_mask": ("desc-brain_mask", "nearest"),
    "magnitude": ("desc-total_magnitude", "linear"),
}


class _TemplateOutputsInputSpec(BaseInterfaceInputSpec):
    derivatives = traits.Dict(mandatory=True, desc="the run's orig-space derivatives: kind -> path "
                                                   "(WriteRunDerivatives.out_files)")
    output_dir = Directory(exists=True, mandatory=True, desc="the derivatives dataset root")
    entities = traits.Dict(mandatory=True, desc="run entities (pybids names)")
    template = traits.Str(mandatory=True, desc="templateflow template name")
    resolutions = traits.List(traits.Int, mandatory=True, minlen=1, desc="templateflow resolution indices")
    # not hashed: a rerun with another thread count reuses the cached transform instead of a slightly different one
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads of this node")


class _TemplateOutputsOutputSpec(TraitedSpec):
    xfm_file = traits.Str(desc="the orig-to-template transform written next to the derivatives")
    out_files = traits.Dict(desc="'res-<N>_<tail>' -> written path")


class TemplateOutputs(SimpleInterface):
    """Register the run's RSS magnitude to one template and write the maps there (see :data:`RESAMPLED`)."""

    input_spec = _TemplateOutputsInputSpec
    output_spec = _TemplateOutputsOutputSpec

    def _run_interface(self, runtime):
        derivatives = self.inputs.derivatives
        # ITK reads this once per process, when it first starts its thread pool
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(self.inputs.num_threads)
        xfm, written = to_template(
            derivatives["magnitude"], {tail: (derivatives[kind], interpolation)
                                       for kind, (tail, interpolation) in RESAMPLED.items()},
            self.inputs.output_dir, self.inputs.entities, template=self.inputs.template,
            resolutions=self.inputs.resolutions, brain_mask_file=derivatives["brain_mask"])
        self._results["xfm_file"] = str(xfm)
        self._results["out_files"] = {f"res-{resolution}_{tail}": str(path)
                                      for resolution, files in written.items() for tail, path in files.items()}
        return runtime
