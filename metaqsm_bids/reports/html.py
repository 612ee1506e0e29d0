"""Per-subject and group HTML reports, written next to their figures in the derivatives dataset.

Layout (as fMRIPrep): ``<output_dir>/sub-<label>.html`` (all runs), ``sub-<label>_ses-<ses>.html``
(one per session, when there are sessions) and the figures in ``<output_dir>/sub-<label>/figures/``;
``<output_dir>/group_report.html`` for the dataset. Every link is relative, so the folder can be
moved or copied. Reports hold no time stamps: rewriting them after an unchanged rerun gives
identical files.
"""
import html
from pathlib import Path

from .. import __version__
from ..io.derivatives import atomic_write, group_summary
from ..io.validation import ensure_bidsignore
from . import content
from .figures import (CHI_RANGE_PPM, R2STAR_RANGE_HZ_AT_3T, RESIDUAL_RANGE_RAD, load_run_images, mip_range,
                      plot_chi_mosaic, plot_mip_mosaic, plot_overview, plot_r2star_mosaic, plot_reliability)

#: Report files the BIDS validator must skip (they are not BIDS files).
BIDSIGNORE = ("*.html", "**/figures")

_CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; max-width: 1180px; margin: 0 auto; padding: 0 18px 40px;
       color: #1d1d1d; line-height: 1.45; font-size: 15px; }
h1 { border-bottom: 3px solid #3b5b92; padding-bottom: 6px; }
h2 { border-bottom: 1px solid #bbb; margin-top: 36px; }
table { border-collapse: collapse; margin: 8px 0 14px; }
th, td { border: 1px solid #c8c8c8; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #eef1f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warn { background: #fff3e0; border-left: 6px solid #e69500; padding: 6px 14px; margin: 10px 0; }
.ok { background: #ebf7ec; border-left: 6px solid #3a9a3a; padding: 6px 14px; margin: 10px 0; }
.fail { color: #b00020; font-weight: bold; }
.methods { background: #f6f6fb; border: 1px solid #d6d6e6; padding: 10px 16px; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; height: auto; border: 1px solid #ccc; }
figcaption { font-size: 13px; color: #444; }
nav a { margin-right: 14px; }
code { background: #f2f2f2; padding: 0 3px; }
"""


def _e(value):
    return html.escape(str(value))


def _page(title, body):
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{_e(title)}</title>\n"
            f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _table(header, rows, numeric=()):
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f"<td class=\"num\">{cell}</td>" if n in numeric else f"<td>{cell}</td>" for n, cell in enumerate(row))
        + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _template_measure(step):
    """What a template-space row of the timing table measures."""
    if step.startswith("Template space "):
        return "registration of the magnitude to the template and resampling of the maps there"
    return ""


def _fmt(value, spec):
    if value is None:
        return "n/a"
    text = format(value, spec)
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0000"


def _warnings_html(warnings):
    if not warnings:
        return "<div class=\"ok\">No warnings.</div>\n"
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    plural = "s" if len(warnings) > 1 else ""
    return f"<div class=\"warn\"><b>{len(warnings)} warning{plural}</b><ul>{items}</ul></div>\n"


def _figures(run, images, output_dir, figures_dir, chi_range_ppm):
    """Render the run's figures (atomically); returns their paths relative to ``output_dir`` and the
    display ranges of the overview (see :func:`~metaqsm_bids.reports.figures.plot_overview`)."""
    figures, ranges = {}, {}
    overview = figures_dir / f"{run.name}_desc-overview_qsm.png"
    atomic_write(overview, lambda tmp: ranges.update(plot_overview(images, tmp, chi_range_ppm, title=run.name)))
    figures["overview"] = overview.relative_to(output_dir).as_posix()
    if images.chimap is not None:
        mosaic = figures_dir / f"{run.name}_desc-mosaic_Chimap.png"
        atomic_write(mosaic, lambda tmp: plot_chi_mosaic(images, tmp, chi_range_ppm,
                                                           title=f"{run.name}: susceptibility (Chimap)"))
        figures["mosaic"] = mosaic.relative_to(output_dir).as_posix()
    if images.r2star is not None:
        b0 = run.provenance.get("B0Tesla") or run.provenance.get("MagneticFieldStrength") or 3.0
        r2star_range = tuple(v * b0 / 3.0 for v in R2STAR_RANGE_HZ_AT_3T)  # R2* grows about linearly with B0
        r2star = figures_dir / f"{run.name}_desc-mosaic_R2starmap.png"
        atomic_write(r2star, lambda tmp: plot_r2star_mosaic(images, tmp, r2star_range,
                                                              title=f"{run.name}: R2* (R2starmap)"))
        figures["r2star"] = r2star.relative_to(output_dir).as_posix()
        ranges["r2star"] = r2star_range
    if images.mip is not None:
        ranges["mip"] = mip_range(images)
        mip = figures_dir / f"{run.name}_desc-mosaic_mip.png"
        atomic_write(mip, lambda tmp: plot_mip_mosaic(images, tmp, ranges["mip"],
                                                        title=f"{run.name}: SWI minimum-intensity projection"))
        figures["mip"] = mip.relative_to(output_dir).as_posix()
    if images.reliable_mask is not None and images.brain_mask is not None:
        reliability = figures_dir / f"{run.name}_desc-reliability_mask.png"
        atomic_write(reliability, lambda tmp: plot_reliability(images, tmp,
                                                                 title=f"{run.name}: reliability map"))
        figures["reliability"] = reliability.relative_to(output_dir).as_posix()
    return figures, ranges


def _reliability_figure(run, stats, figure):
    """The reliability map's figure and a caption with its thresholds (from the sidecar) and its count."""
    bfr = run.provenance.get("BackgroundFieldRemoval", {})
    signal = bfr.get("MinSignalFraction")
    residual = bfr.get("MaxResidualRad")
    rules = ([f"an RSS magnitude below {signal:g} × its median in the brain mask"] if signal is not None else []) \
        + ([f"an echo-fit residual above {residual:g} rad"] if residual is not None else [])
    fraction = stats.get("unreliable_fraction_of_brain")
    residual_row = (" Below: the echo-fit residual (<code>desc-echofit_residual</code>) in the brain mask on "
                    f"{RESIDUAL_RANGE_RAD[0]:g} to {RESIDUAL_RANGE_RAD[1]:g} rad."
                    if run.paths.get("fit_residual") is not None else "")
    return (f"<figure><img src=\"{_e(figure)}\" alt=\"reliability map of {_e(run.name)}\">"
            "<figcaption><b>Reliability map</b> (<code>desc-reliable_mask</code>): the brain-mask voxels whose field "
            f"is trusted. <b>{_fmt(stats.get('unreliable_voxels'), 'd')} voxels "
            f"({_fmt(None if fraction is None else 100 * fraction, '.2f')}% of the brain mask) were excluded</b>, "
            "in yellow over the magnitude" + (f", for {' or '.join(rules)}" if rules else "")
            + " (bone or air inside the brain mask, lesions whose signal decays within the first echoes, phase off "
            "the echo-time line); they are left out of background removal's fit, and their local field is completed "
            "from the reliable field around them, so they keep a susceptibility value (haemorrhages, calcifications "
            "and veins stay in the map); only the voids that reach the brain mask's surface leave the QSM mask."
            f"{residual_row} Axial slices: those with the most excluded voxels, then "
            "others spread over the brain mask; neurological convention.</figcaption>"
            "</figure>\n")


def _run_section(run, stats, warnings, figures, ranges, output_dir):
    """One run's section of the report: its warnings, figures, checks, timings, parameters and files."""
    return "".join([f"<h2 id=\"{_e(run.name)}\">Run {_e(run.name)}</h2>\n", _warnings_html(warnings),
                    _figures_html(run, stats, figures, ranges), _checks_html(run, stats), _timings_html(run),
                    _parameters_html(run.provenance), _files_html(run, output_dir)])


def _figures_html(run, stats, figures, ranges):
    """The run's figures: orthogonal views, and the Chimap, R2* and SWI mIP mosaics and reliability map it has."""
    parts = [
        f"<figure><img src=\"{_e(figures['overview'])}\" alt=\"orthogonal views of {_e(run.name)}\">"
        "<figcaption>Rows: RSS magnitude with the brain mask (red) and the QSM mask (cyan) outlined; total field "
        f"(Hz, shown on ±{ranges['total_field']:g} Hz) in the brain mask; local field after background "
        f"removal (Hz, ±{ranges['local_field']:g} Hz) in the QSM mask; susceptibility (ppm) on the "
        f"<b>fixed range {ranges['chimap'][0]:g} to {ranges['chimap'][1]:g} ppm</b> in the QSM mask. Views cross "
        "at the centre of the QSM mask, cropped to the brain. Neurological convention: the subject's left is on "
        "the left.</figcaption></figure>\n"]
    if "mosaic" in figures:
        parts.append(f"<figure><img src=\"{_e(figures['mosaic'])}\" alt=\"Chimap mosaic of {_e(run.name)}\">"
                     f"<figcaption>Axial Chimap slices on the fixed range {ranges['chimap'][0]:g} to "
                     f"{ranges['chimap'][1]:g} ppm; black is outside the QSM mask.</figcaption></figure>\n")
    if "r2star" in figures:
        parts.append(_r2star_figure(run, figures["r2star"], ranges["r2star"]))
    if "mip" in figures:
        parts.append(_mip_figure(run, figures["mip"], ranges["mip"]))
    if "reliability" in figures:
        parts.append(_reliability_figure(run, stats, figures["reliability"]))
    return "".join(parts)


def _r2star_figure(run, figure, r2star_range):
    """The R2* mosaic ``figure`` shown on ``r2star_range`` (1/s), captioned with the fit from the run's sidecar."""
    fit = run.sidecars.get("r2star", {}).get("R2starFit", {})
    low, high = r2star_range
    return (f"<figure><img src=\"{_e(figure)}\" alt=\"R2* mosaic of {_e(run.name)}\">"
            f"<figcaption><b>R2*</b> (<code>R2starmap</code>, 1/s; T2* = 1/R2* in <code>T2starmap</code>, s) "
            f"by the {_e(fit.get('Method', 'fit'))} of the {len(fit.get('EchoTime') or [])} echoes' "
            f"magnitude, in the brain mask, on the fixed range {low:g} to {high:g} s<sup>-1</sup> (grey "
            "matter 15-20, white matter 20-25, iron-rich nuclei 30-50 s<sup>-1</sup> at 3 T; veins and "
            "haemorrhages saturate); black is outside the brain mask.</figcaption></figure>\n")


def _mip_figure(run, figure, mip_range):
    """The SWI mIP mosaic ``figure`` shown on ``mip_range``, captioned with the SWI settings from the run's sidecar."""
    swi = run.sidecars.get("mip", {})
    params, slab = swi.get("SWI", {}), swi.get("MinimumIntensityProjection", {})
    te_ms = 1000 * params["EchoTimeUsed"] if "EchoTimeUsed" in params else None
    return (f"<figure><img src=\"{_e(figure)}\" alt=\"SWI mIP mosaic of {_e(run.name)}\">"
            "<figcaption><b>SWI minimum-intensity projection</b> (<code>desc-mip_T2starw</code>; the SWI "
            "in <code>desc-swi_T2starw</code>, arbitrary units): the RSS magnitude times the phase mask "
            f"of the local field at TE {_fmt(te_ms, 'g')} ms "
            f"(power {_e(params.get('PhaseMaskPower', 'n/a'))}, {_e(params.get('PhaseMaskSign', 'n/a'))} "
            f"phase darkened), minimum over {_fmt(slab.get('SlabThicknessMm'), 'g')} mm slabs; shown on "
            f"{mip_range[0]:g} to {mip_range[1]:g} in the brain mask (black outside). Veins "
            "are the dark lines.</figcaption></figure>\n")


def _checks_html(run, stats):
    """The run's checks table: mask sizes, the reliability map, χ statistics and each registration's Dice."""
    def stat(key, spec, scale=1):
        return _fmt(stats[key] * scale if key in stats else None, spec)

    rows = [
        ("Brain mask", f"{stat('brain_mask_voxels', 'd')} voxels, {stat('brain_volume_ml', '.0f')} mL, "
                       f"{stat('brain_fraction_of_fov', '.1f', 100)}% of the field of view"),
        ("Reliability map", f"{stat('unreliable_voxels', 'd')} voxels of the brain mask excluded from background "
                            f"removal's fit ({stat('unreliable_fraction_of_brain', '.2f', 100)}%), their local field "
                            "completed"),
        ("QSM mask", f"{stat('qsm_mask_voxels', 'd')} voxels, {stat('qsm_fraction_of_brain', '.0f', 100)}% of the "
                     "brain mask"),
        ("χ in the QSM mask", f"mean {stat('chi_mean_ppm', '.4f')} ppm, SD {stat('chi_sd_ppm', '.4f')} ppm, "
                              f"1st-99th percentile {stat('chi_p1_ppm', '.3f')} to {stat('chi_p99_ppm', '.3f')} ppm"),
    ]
    for template, (_, xfm) in sorted(run.transforms.items()):
        registration = xfm.get("Registration", {})
        rows.append((_e(f"Registration to {template}"), _e(
            f"{', '.join(registration.get('Stages', []))}; Dice of the brain mask with the template's "
            f"{_fmt(registration.get('BrainMaskDice'), '.3f')}")))
    return "<h3>Checks</h3>\n" + _table(["Quantity", "Value"], rows)


def _timings_html(run):
    """The run's processing-time table (each step's wall time and what it covers); empty without timings."""
    timings = content.run_timings(run)
    if not timings:
        return ""
    total = sum(seconds for _, seconds in timings)
    rows = [(_e(step), f"{seconds:.2f}", _e(content.STEP_MEASURES.get(step, _template_measure(step))))
            for step, seconds in timings]
    rows.append(("<b>total</b>", f"<b>{total:.2f}</b>", "the steps above (not the scheduling between them)"))
    return ("<h3>Processing time</h3>\n<p>Wall time of each step's computation, reading its inputs "
            "included: phase scaling is the step that reads the raw, compressed NIfTI files.</p>\n"
            + _table(["Step", "Seconds", "What the time covers"], rows, numeric=(1,)))


def _parameters_html(sidecar):
    """The parameters and versions table from the run's provenance ``sidecar``, steps in pipeline order; empty
    without any."""
    rows = []
    for step in [s for s in content.STEP_ORDER if s in sidecar] + sorted(
            k for k, v in sidecar.items() if isinstance(v, dict) and k not in content.STEP_ORDER):
        for key, value in sorted(sidecar[step].items()):
            if key != "ElapsedSeconds":
                rows.append((_e(step), _e(key), _e(content.format_value(value))))
    for key in ("EchoTime", "MagneticFieldStrength", "SoftwareVersions"):
        if key in sidecar:
            rows.append(("Acquisition" if key != "SoftwareVersions" else "Software", _e(key),
                         _e(content.format_value(sidecar[key]))))
    return "<h3>Parameters and versions</h3>\n" + _table(["Step", "Parameter", "Value"], rows) if rows else ""


def _files_html(run, output_dir):
    """The run's files table: each map (in each space) and transform, linked relative to ``output_dir``."""
    def link(path):
        return f"<a href=\"{_e(path.relative_to(output_dir).as_posix())}\">{_e(path.name)}</a>"

    files = [(_e(kind), link(path) if path is not None else "<span class=\"fail\">missing</span>")
             for kind, path in run.paths.items()]
    files += [(_e(f"{kind} (space-{space})"), link(path))
              for space, paths in sorted(run.spaces.items()) for kind, path in paths.items()]
    files += [(_e(f"transform orig to {template}"), link(path))
              for template, (path, _) in sorted(run.transforms.items())]
    return "<h3>Files</h3>\n" + _table(["Map", "File"], files)


def _r2star_fit(run):
    """``{"R2starFit": ...}`` from the run's R2* sidecar, for the methods paragraph; {} without an R2* map."""
    fit = run.sidecars.get("r2star", {}).get("R2starFit")
    return {"R2starFit": fit} if fit else {}


def _methods_section(runs):
    paragraphs = [content.methods_paragraph({**run.provenance, **_r2star_fit(run)}) for run in runs]
    if not paragraphs:
        return ""
    distinct = []
    for run, paragraph in zip(runs, paragraphs):
        for entry in distinct:
            if entry[0] == paragraph:
                entry[1].append(run.name)
                break
        else:
            distinct.append((paragraph, [run.name]))
    texts, references = content.number_citations([paragraph for paragraph, _ in distinct])
    body = ["<h2 id=\"methods\">Methods</h2>\n<p>This text was generated from the parameters recorded in the "
            "derivatives' sidecars; you may paste it into a paper.</p>\n"]
    for text, (_, names) in zip(texts, distinct):
        scope = f"<p><i>Runs: {_e(', '.join(names))}</i></p>" if len(distinct) > 1 else ""
        body.append(f"{scope}<div class=\"methods\"><p>{_e(text)}</p>")
        versions = runs[[r.name for r in runs].index(names[0])].provenance.get("SoftwareVersions")
        if versions:
            body.append(f"<p>Software versions: {_e(versions)}.</p>")
        body.append("</div>\n")
    body.append("<h3>References</h3>\n<ol>" + "".join(f"<li value=\"{n}\">{_e(text)}</li>" for n, text in references)
                + "</ol>\n")
    return "".join(body)


def _subject_page(title, label, runs, results, missing, output_dir):
    nav = " ".join(f"<a href=\"#{_e(run.name)}\">{_e(run.name)}</a>" for run in runs)
    summary_rows = []
    for run in runs:
        stats, warnings, _, _ = results[run.name]
        summary_rows.append((
            f"<a href=\"#{_e(run.name)}\">{_e(run.name)}</a>", "processed",
            _e(run.provenance.get("DipoleInversion", {}).get("Method", "n/a")),
            _fmt(stats.get("brain_volume_ml"), ".0f"),
            f"{_fmt(stats.get('chi_mean_ppm'), '.4f')} ± {_fmt(stats.get('chi_sd_ppm'), '.4f')}",
            f"<span class=\"fail\">{len(warnings)}</span>" if warnings else "0",
            f"{sum(s for _, s in content.run_timings(run)):.1f}",
        ))
    for name in missing:
        summary_rows.append((_e(name), "<span class=\"fail\">no output</span>", "", "", "", "", ""))
    body = [f"<h1>{_e(title)}</h1>\n",
            f"<p>metaqsm {_e(__version__)} quality report for participant <b>sub-{_e(label)}</b>: "
            f"{len(runs)} run(s) with derivatives"
            + (f", {len(missing)} raw run(s) without" if missing else "") + ".</p>\n",
            f"<nav>{nav} <a href=\"#methods\">Methods</a> <a href=\"#about\">About</a></nav>\n",
            "<h2>Summary</h2>\n",
            _table(["Run", "Status", "Inversion", "Brain (mL)", "χ mean ± SD in QSM mask (ppm)",
                    "Warnings", "Time (s)"], summary_rows, numeric=(3, 4, 5, 6))]
    if missing:
        body.append("<div class=\"warn\">Runs without output failed, were excluded by the participant-level "
                    "options, or have not been processed yet; the participant-level log names the cause.</div>\n")
    for run in runs:
        stats, warnings, figures, ranges = results[run.name]
        body.append(_run_section(run, stats, warnings, figures, ranges, output_dir))
    body.append(_methods_section(runs))
    body.append(
        "<h2 id=\"about\">About this report</h2>\n<p>Images are shown in the closest RAS orientation of their "
        "affine (nibabel <code>as_closest_canonical</code>), in the <b>neurological convention</b>: the subject's "
        "left is on the viewer's left (letters L/R, A/P, S/I on each panel); oblique slabs are shown in their own "
        "slice planes. Voxels are drawn at their true aspect ratio. The susceptibility colour range is fixed "
        f"({CHI_RANGE_PPM[0]:g} to {CHI_RANGE_PPM[1]:g} ppm unless stated otherwise) so maps compare across runs "
        "and participants; field-map ranges are the 99th percentile of |field| in the mask, rounded up.</p>\n")
    return _page(title, "".join(body))


def write_subject_report(output_dir, subject, bids_dir=None, chi_range_ppm=CHI_RANGE_PPM):
    """Write ``<output_dir>/sub-<label>.html`` (and one report per session) from the derivatives found there.

    Figures go to ``<output_dir>/sub-<label>/figures/``. With ``bids_dir``, raw MEGRE runs without
    derivatives are listed as such. Returns the path of the subject report. Raises ValueError if
    the participant has neither derivatives nor (with ``bids_dir``) raw runs.
    """
    output_dir = Path(output_dir)
    label = content.subject_label(subject)
    runs = content.find_run_outputs(output_dir, label)
    raw = content.find_raw_runs(bids_dir, label) if bids_dir is not None else []
    if not runs and not raw:
        raise ValueError(f"sub-{label}: no derivatives in {output_dir}"
                         + (f" and no MEGRE runs in {bids_dir}" if bids_dir is not None else ""))
    figures_dir = output_dir / f"sub-{label}" / "figures"
    results = {}
    for run in runs:
        images = load_run_images({kind: run.paths[kind] for kind in content.KINDS})
        stats, warnings = content.run_checks(run, images)
        figures, ranges = _figures(run, images, output_dir, figures_dir, chi_range_ppm)
        results[run.name] = (stats, warnings, figures, ranges)
    done = {run.name for run in runs}
    missing = [name for name in raw if name not in done]
    ensure_bidsignore(output_dir, BIDSIGNORE)
    report = output_dir / f"sub-{label}.html"
    _write_text(report, _subject_page(f"sub-{label}", label, runs, results, missing, output_dir))
    sessions = sorted({run.session for run in runs if run.session} |
                      {content.run_entities(name).get("ses") for name in missing} - {None})
    for session in sessions:
        in_session = [run for run in runs if run.session == session]
        missing_here = [name for name in missing if content.run_entities(name).get("ses") == session]
        _write_text(output_dir / f"sub-{label}_ses-{session}.html",
                    _subject_page(f"sub-{label} ses-{session}", label, in_session, results, missing_here, output_dir))
    return report


def write_group_report(output_dir, bids_dir, failures=None):
    """Write ``<output_dir>/group_report.html``: every participant and run, processed or not.

    Uses the rows of :func:`metaqsm_bids.io.derivatives.group_summary` (which also writes
    ``group_summary.tsv``) and adds the raw runs that have no output. ``failures`` maps a
    participant label to the reason it failed (e.g. the participant level's error messages);
    runs without output and without a recorded failure are "not processed". Returns the path.
    """
    output_dir, bids_dir = Path(output_dir), Path(bids_dir)
    failures = {content.subject_label(k): v for k, v in (failures or {}).items()}
    _, summary = group_summary(output_dir, bids_dir)
    processed = {}
    for row in summary:
        if row["status"] == "processed":
            processed.setdefault(row["participant_id"], []).append(row)
    subjects = sorted({row["participant_id"][4:] for row in summary}
                      | {p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir()})
    rows, counts = [], {"processed": 0, "failed": 0, "not processed": 0}
    for label in subjects:
        done = processed.get(f"sub-{label}", [])
        names = {row["run"] for row in done}
        report = output_dir / f"sub-{label}.html"
        link = f"<a href=\"{_e(report.name)}\">{_e(report.name)}</a>" if report.exists() else ""
        for row in done:
            counts["processed"] += 1
            run_link = f"<a href=\"{_e(report.name)}#{_e(row['run'])}\">{_e(report.name)}</a>" if report.exists() \
                else ""
            rows.append((_e(row["participant_id"]), _e(row["run"]), "processed", _e(row["inversion"]),
                         _e(row["mask_voxels"]), f"{_e(row['chi_mean_ppm'])} ± {_e(row['chi_std_ppm'])}",
                         run_link))
        for name in [n for n in content.find_raw_runs(bids_dir, label) if n not in names] or ([] if done else ["n/a"]):
            status = "failed" if label in failures else "not processed"
            counts[status] += 1
            reason = f": {_e(failures[label])}" if label in failures else ""
            rows.append((f"sub-{_e(label)}", _e(name), f"<span class=\"fail\">{status}</span>{reason}", "", "", "",
                         link))
    body = [
        "<h1>metaqsm group report</h1>\n",
        f"<p>metaqsm {_e(__version__)}; raw dataset <code>{_e(bids_dir.resolve())}</code>. "
        f"{len(subjects)} participant(s); runs: {counts['processed']} processed, {counts['failed']} failed, "
        f"{counts['not processed']} not processed. The processed runs' values are also in "
        "<a href=\"group_summary.tsv\">group_summary.tsv</a>.</p>\n",
        _table(["Participant", "Run", "Status", "Inversion", "QSM mask voxels",
                "χ mean ± SD in QSM mask (ppm)", "Report"], rows, numeric=(4, 5)),
        "<p>Runs not processed failed before producing output, were excluded by the participant-level options, "
        "or have not been run yet; the participant-level log names the cause.</p>\n",
    ]
    ensure_bidsignore(output_dir, BIDSIGNORE + ("group_summary.tsv",))
    path = output_dir / "group_report.html"
    _write_text(path, _page("metaqsm group report", "".join(body)))
    return path
