"""One :class:`MethodSpec` per background field removal and per dipole inversion: everything the app knows about a
method, declared beside its function in the method's own module and listed in its stage's registry
(:mod:`metaqsm_bids.qsm.background.registry`, :mod:`metaqsm_bids.qsm.inversion.registry`).

What is derived from the specs and written nowhere else: the CLI's choices and per-method options
(:mod:`metaqsm_bids.cli.parser`), the workflow's connections (:func:`metaqsm_bids.workflows.qsm.init_qsm_wf`), the
inputs the step functions give each method (:mod:`metaqsm_bids.steps`), the sidecars' ``Method`` and parameter keys,
and the report's methods text and references (:mod:`metaqsm_bids.reports.content`).

Adding a method: write its module (the function, its parameters dataclass and ``SPEC``), then add ``SPEC`` to the
tuple of its stage's registry.
"""
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from types import MappingProxyType

#: What a method may take by keyword besides the field, the mask and the voxel size (mm) -- and, for an
#: inversion, the B0 direction, which every inversion takes. A spec names those it needs in ``inputs``; the step
#: functions give it exactly those.
INPUTS = MappingProxyType({
    "b0_dir": "the unit B0 vector in voxel axes (a background removal that models dipoles)",
    "magnitude": "the root-sum-of-squares magnitude over echoes (arbitrary units): a noise weight, an edge prior or "
                 "a network input. A background removal that takes it fits the whole QSM mask, with weight 0 on "
                 "the unreliable voxels; the others fit the reliable voxels only",
    "delta_te_s": "the echo spacing (s) of the field fit: the mean spacing, or the echo time of a single echo",
    "b0_tesla": "the B0 (T) that converts the field from Hz to ppm",
    "device": "the torch device: auto, cpu or cuda",
})
#: Checks a parameter's value may ask for (``check`` of :func:`parameter`).
CHECKS = ("positive", "positive_int", "positive_or_off", "count_or_off")


def parameter(default, help, *, unit="", words=None, option=None, check=None, choices=None, metavar=None):
    """A field of a method's parameters dataclass: a setting a user may change.

    ``help``: what it is (the CLI's help); ``unit``: "mm", "ppm", "Hz", "rad", "s" or "" (dimensionless);
    ``words``: what the methods text says before its value (default: ``help``); ``option``: the CLI option
    (default ``--<method>-<name>``, see :meth:`MethodSpec.option`); ``check``: one of :data:`CHECKS`
    (``positive_int``: a whole number > 0; ``positive_or_off``: a value > 0, or None, given as 0 on the command
    line; ``count_or_off``: a whole number > 0, or None, given as 0), or ``choices``: its allowed values;
    ``metavar``: the value's name in the CLI's help.
    """
    if check not in (None, *CHECKS):
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    return field(default=default, metadata={"help": help, "unit": unit, "words": words or help, "option": option,
                                             "check": check, "choices": choices, "metavar": metavar})


@dataclass(frozen=True)
class NoParameters:
    """The parameters of a method that has none a user may set."""


def sidecar_key(name):
    """A Python parameter name as a BIDS-style sidecar key: ``threshold`` -> ``Threshold``, ``lambda_`` ->
    ``Lambda``, ``radius_mm`` -> ``RadiusMm``."""
    return "".join(part[:1].upper() + part[1:] for part in name.strip("_").split("_"))


@dataclass(frozen=True)
class MethodSpec:
    """A background field removal or a dipole inversion as the app sees it.

    ``name``: the registry key and the CLI's choice (lower case); ``function``: the algorithm, called as
    ``function(field, mask, voxel_size_mm[, b0_dir for an inversion], **parameters, **inputs)``;
    ``display_name``: the sidecars' ``Method``; ``description``: the methods text's words for it;
    ``citations``: reference key -> reference text (the keys the methods text cites); ``parameters``: a frozen
    dataclass of :func:`parameter` fields, the settings a user may change, with their defaults and units;
    ``inputs``: the keyword inputs it needs, from :data:`INPUTS`.
    """

    name: str
    function: object
    display_name: str
    description: str
    citations: dict = field(default_factory=dict)
    parameters: type = NoParameters
    inputs: tuple = ()

    def __post_init__(self):
        unknown = sorted(set(self.inputs) - set(INPUTS))
        if unknown:
            raise ValueError(f"{self.name}: unknown inputs {unknown}; choose from {', '.join(INPUTS)}")
        if not is_dataclass(self.parameters):
            raise TypeError(f"{self.name}: parameters must be a dataclass")
        without_default = [f.name for f in fields(self.parameters) if f.default is MISSING]
        if without_default:
            raise ValueError(f"{self.name}: parameters without a default: {without_default}")

    def settings(self, values=None):
        """The parameters dataclass holding ``values`` (a dict; the defaults for what it lacks)."""
        names = {f.name for f in fields(self.parameters)}
        unknown = sorted(set(values or {}) - names)
        if unknown:
            raise ValueError(f"{self.name} takes no parameter {', '.join(unknown)}; its parameters: "
                             f"{', '.join(sorted(names)) or 'none'}")
        return self.parameters(**(values or {}))

    def own(self, values):
        """The items of ``values`` (parameter name -> value, for any methods) that are its parameters."""
        names = {f.name for f in fields(self.parameters)}
        return {name: value for name, value in values.items() if name in names}

    def option(self, parameter_field):
        """The CLI option of one of its parameters: its own, else ``--<method>-<name>``."""
        name = parameter_field.name.strip("_").replace("_", "-")
        return parameter_field.metadata.get("option") or f"--{self.name}-{name}"

    def sidecar(self, settings):
        """The sidecar's ``Method`` and its parameters' values (BIDS-style keys) for ``settings``."""
        return {"Method": self.display_name, **{sidecar_key(name): value for name, value in asdict(settings).items()}}

    def parameter_words(self):
        """Sidecar key -> (words before the value, unit after it) of its parameters, for the methods text."""
        return {sidecar_key(f.name): (f.metadata["words"], f" {f.metadata['unit']}" if f.metadata["unit"] else "")
                for f in fields(self.parameters)}

    def keyword_inputs(self, available):
        """The inputs it needs, picked from ``available`` (name -> value, the names of :data:`INPUTS`)."""
        return {name: available[name] for name in self.inputs}


def registry(*specs):
    """Name -> spec of ``specs``, in their order (the CLI lists them sorted)."""
    return {spec.name: spec for spec in specs}


def lookup(methods, name, stage):
    """The spec of ``methods`` (a registry) named ``name``; a ValueError naming the choices if there is none."""
    try:
        return methods[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {stage} {name!r}; choose one of: {', '.join(sorted(methods))}") from None


def find(methods, method):
    """The spec of ``methods`` whose name or display name is ``method`` (a sidecar's ``Method``; case and hyphens
    ignored), or None."""
    key = str(method).lower().replace("-", "")
    return next((spec for spec in methods.values()
                 if key in (spec.name.lower().replace("-", ""), spec.display_name.lower().replace("-", ""))), None)
