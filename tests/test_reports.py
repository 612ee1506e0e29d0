"""HTML reports written post hoc from a derivatives dataset made by the real CLI."""
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from metaqsm_bids.reports import write_group_report, write_subject_report
from metaqsm_bids.reports.content import (CHI_EXTREME_PPM, find_run_outputs, methods_paragraph, number_citations,
                                          run_checks)
from metaqsm_bids.reports.figures import RunImages, load_run_images, plot_overview, section
from metaqsm_bids.sim.dataset import RunSpec, simulate_dataset

from .conftest import run_cli

RENDER = Path(__file__).resolve().parents[1] / "benchmarks" / "render_report.py"
RUNS = [
    RunSpec("01", session="1", shape=(40, 40, 20), voxel_size_mm=(1.8, 1.8, 3.0), seed=1),
    RunSpec("01", session="2", shape=(40, 40, 20), voxel_size_mm=(1.8, 1.8, 3.0), oblique_deg=20.0, seed=2),
    RunSpec("02", shape=(40, 40, 20), voxel_size_mm=(1.8, 1.8, 3.0), seed=3),  # left unprocessed
]


def _plant_unreliable_voxels(bids_dir, folder, prefix):
    """Near the brain's centre: one echo's phase 1.5 rad off its line, and a voxel with 1 % of its signal.

    Returns the two voxels (array indices); the reliability map must exclude both.
    """
    anat = Path(bids_dir) / folder / "anat"
    truth = Path(bids_dir) / "derivatives" / "metaqsm-simulate" / folder / "anat" / f"{prefix}_desc-brain_mask.nii.gz"
    centre = tuple(int(c) for c in np.argwhere(np.asarray(nib.load(truth).dataobj) > 0).mean(0).round())
    jumpy, dark = centre, (centre[0] + 3, *centre[1:])

    def rewrite(path, voxel, change):
        img = nib.load(path)
        data = np.asarray(img.dataobj, np.float32)
        data[voxel] = change(data[voxel])
        nib.save(nib.Nifti1Image(data, img.affine, img.header), path)

    rewrite(anat / f"{prefix}_echo-3_part-phase_MEGRE.nii.gz", jumpy,
            lambda phase: np.angle(np.exp(1j * (phase + 1.5))))  # kept within [-pi, pi]
    for path in sorted(anat.glob(f"{prefix}_echo-*_part-mag_MEGRE.nii.gz")):
        rewrite(path, dark, lambda magnitude: 0.01 * magnitude)
    return jumpy, dark


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    bids_dir, out = root / "bids", root / "out"
    simulate_dataset(bids_dir, RUNS)
    planted = _plant_unreliable_voxels(bids_dir, "sub-01/ses-1", "sub-01_ses-1")
    result = run_cli("metaqsm", bids_dir, out, "participant", "-w", root / "work", "--participant-label", "01",
                     "--nprocs", "2", "--omp-nthreads", "1", "--inversion", "tkd")
    assert result.returncode == 0, result.stderr[-3000:]
    report = write_subject_report(out, "sub-01", bids_dir)
    return bids_dir, out, report, planted


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for key, value in attrs if key in ("src", "href")]


def _links(html_path):
    parser = _Links()
    parser.feed(html_path.read_text())
    return parser.links


def test_reports_and_figures_exist_and_links_resolve(processed):
    _, out, report, _ = processed
    assert report == out / "sub-01.html"
    pages = [report, out / "sub-01_ses-1.html", out / "sub-01_ses-2.html"]
    for page in pages:
        links = _links(page)
        images = [link for link in links if link.endswith(".png")]
        assert len(images) == (10 if page == report else 5), page  # overview, mosaics of chi, R2*, SWI mIP, reliability

        for link in links:
            if link.startswith("#"):
                assert f'id="{link[1:]}"' in page.read_text(), link
                continue
            assert not re.match(r"^[a-z]+:", link) and not link.startswith("/"), f"not relative: {link}"
            assert (out / link).is_file(), link
        for link in images:
            with Image.open(out / link) as img:
                pixels = np.asarray(img.convert("L"), dtype=np.float32)
            assert img.format == "PNG" and min(img.size) > 300 and pixels.std() > 20, link
    # a session's report holds that session's runs only
    session_2 = (out / "sub-01_ses-2.html").read_text()
    assert "sub-01_ses-2" in session_2 and "sub-01_ses-1_desc-overview" not in session_2


def test_report_states_ranges_parameters_timings_and_citations(processed):
    _, out, report, _ = processed
    text = report.read_text()
    assert "fixed range -0.15 to 0.15 ppm" in text
    assert "neurological convention" in text
    sidecar = json.loads((out / "sub-01/ses-1/anat/sub-01_ses-1_Chimap.json").read_text())
    for step in ("PhaseScaling", "BrainMask", "TotalField", "BackgroundFieldRemoval", "DipoleInversion"):
        assert f"<td>{step}</td><td class=\"num\">{sidecar[step]['ElapsedSeconds']:.2f}</td>" in text, step
    assert "threshold 0.2" in text and "a background polynomial of degree 2" in text  # TKD's and TFI's, in prose
    assert "preconditioner outside the mask 30" in text  # TFI's fixed settings, in prose too
    assert "reading and decompressing every echo" in text and "What the time covers" in text  # what a row measures
    assert sidecar["SoftwareVersions"] in text
    for reference in ("Meta-QSM", "Preconditioned total field inversion (TFI)",
                      "projection onto dipole fields (PDF). NMR Biomed", "Shmueli K",
                      "Schofield MA, Zhu Y"):
        assert reference in text, reference
    # citations are numbered in order: the method paper first
    assert re.search(r"metaqsm \S+ \[1\]", text)
    # TFI (the default background removal) cites its paper and PDF's, whose model it extends
    assert "less the sources&#x27; field [3, 4]" in text and "(TKD) [5]" in text


def test_r2star_panel_shows_the_map_with_its_units(processed):
    _, out, report, _ = processed
    text = report.read_text()
    for name in ("sub-01_ses-1", "sub-01_ses-2"):
        figure = f"sub-01/figures/{name}_desc-mosaic_R2starmap.png"
        assert f'<img src="{figure}" alt="R2* mosaic of {name}">' in text
        with Image.open(out / figure) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
        # rendered: a colour map (inferno), not grey, and not blank
        assert min(img.size) > 300 and pixels.std() > 20 and np.abs(pixels[..., 0] - pixels[..., 2]).max() > 50
    assert "<code>R2starmap</code>, 1/s" in text and "fixed range 0 to 60 s<sup>-1</sup>" in text
    assert "weighted log-linear fit of the 4 echoes" in text
    assert "R2* was fitted to the magnitude of the echoes in the brain mask by a log-linear least-squares fit " \
           "weighted by the squared magnitude, clipped to 0-1000 s^-1; T2* is its inverse, at most 1 s." in text
    assert "missing derivative" not in text


def test_swi_mip_panel_shows_the_projection_with_its_colour_bar(processed):
    _, out, report, _ = processed
    text = report.read_text()
    for name in ("sub-01_ses-1", "sub-01_ses-2"):
        figure = f"sub-01/figures/{name}_desc-mosaic_mip.png"
        assert f'<img src="{figure}" alt="SWI mIP mosaic of {name}">' in text
        with Image.open(out / figure) as img:
            pixels = np.asarray(img.convert("L"), dtype=np.float32)
        assert min(img.size) > 300 and pixels.std() > 20
        # the colour bar: a column of grey levels from black to white right of the mosaic
        bar = pixels[:, int(0.885 * img.size[0]) + 3]
        assert bar.max() > 240 and bar.min() < 15
    assert "<b>SWI minimum-intensity projection</b> (<code>desc-mip_T2starw</code>" in text
    assert "(power 4, negative phase darkened), minimum over 9 mm slabs" in text  # 3 mm slices: 3 of them
    assert "missing derivative" not in text


def test_methods_name_arlo_and_cite_it():
    paragraph, cited = methods_paragraph({"EchoTime": [0.004, 0.008, 0.012], "R2starFit": {
        "Method": "ARLO", "R2starRangeHz": [0.0, 1000.0], "T2starMaxSeconds": 1.0}})
    assert "auto-regression on linear operations (ARLO) [pei2015]" in paragraph and cited[-1] == "pei2015"


@pytest.mark.parametrize("lambda_", [0.1, None])
def test_methods_say_the_networks_data_consistency_step(lambda_):
    paragraph, _ = methods_paragraph({"EchoTime": [0.004, 0.008], "DipoleInversion": {
        "Method": "metaqsm", "Orientations": "pair", "DataConsistencyLambda": lambda_}})
    assert "the Meta-QSM network" in paragraph and "None" not in paragraph
    assert ("pulled onto the field by a k-space data-consistency step, lambda 0.1" in paragraph) == (lambda_ == 0.1)
    assert ("data-consistency" in paragraph) == (lambda_ is not None)


def test_methods_follow_the_sidecar():
    sidecar = {"SoftwareVersions": "metaqsm 9.9, numpy 2", "EchoTime": [0.005], "MagneticFieldStrength": 7.0,
               "PhaseScaling": {"PhaseUnits": "arbitrary"}, "BrainMask": {"Method": "user-provided"},
               "BackgroundFieldRemoval": {"Method": "pdf", "Iterations": 50, "MinSignalFraction": 0.15,
                                          "UnreliableVoxelsExcluded": 3, "UnreliableFractionOfBrain": 0.001},
               "DipoleInversion": {"Method": "medi", "lambda": 1000.0, "ElapsedSeconds": 3.0}}
    (text,), references = number_citations([methods_paragraph(sidecar)])
    # one echo, no residual test: the reliability sentence gives the signal threshold only, and no counts
    assert ("magnitude below 0.15 times its median in the mask were considered unreliable and left out of "
            "background field removal") in text and "residual" not in text and "Unreliable" not in text
    assert text.startswith("Quantitative susceptibility maps were reconstructed with metaqsm 9.9 [1] from 1 echo "
                           "(TE = 5 ms) of a gradient-echo acquisition at 7 T.")
    assert "vendor integer units were scaled to radians" in text and "provided by the user" in text
    assert "(PDF) [2]" in text and "(MEDI) [3, 4] (lambda 1000)" in text and "Iterations" not in text
    assert [n for n, _ in references] == [1, 2, 3, 4] and "projection onto dipole fields" in references[1][1]


@pytest.mark.parametrize("region, words", [
    ("brain", "relative to its mean within the mask where the local field is defined (the whole brain)"),
    ("csf", "relative to the mean of the ventricular cerebrospinal fluid (812 voxels"),
    ("none", "as the inversion returned it")])
def test_methods_say_what_the_chimap_is_relative_to_and_no_completion_counts(region, words):
    paragraph, _ = methods_paragraph({
        "EchoTime": [0.005, 0.01],
        "BackgroundFieldRemoval": {"Method": "pdf", "MinSignalFraction": 0.15, "CompletedVoxels": 31,
                                   "CompletionIterations": 12, "UnreliableVoxels": "left out of the fit"},
        "DipoleInversion": {"Method": "tkd", "threshold": 0.2},
        "SusceptibilityReference": {"Region": region, "Voxels": 812}})
    assert words in paragraph
    # the completion has its sentence; its counts differ per run and stay out of the method's brackets
    assert "(PDF) [liu2011pdf]." in paragraph and "Completed" not in paragraph and "31" not in paragraph


def test_methods_say_whether_the_csf_rim_was_removed():
    mask = {"Method": "magnitude threshold + morphology (metaqsm_bids.qsm.mask.brain.brain_mask)",
            "Input": "root-sum-of-squares magnitude over echoes"}
    removed, _ = methods_paragraph({"EchoTime": [0.005, 0.01],
                                    "BrainMask": {**mask, "ExtracerebralCSF": "removed: ..."}})
    kept, _ = methods_paragraph({"EchoTime": [0.005, 0.01],
                                 "BrainMask": {**mask, "ExtracerebralCSF": "kept (one echo)"}})
    assert "magnitude threshold and morphology" in removed and "magnitude threshold and morphology" in kept
    assert "by its slow signal decay (R2*)" in removed and "(S0)" in removed
    assert "R2*" not in kept


def test_reliability_map_is_written_with_its_sidecar_and_shown(processed):
    """The planted voxels are excluded from the reliability map but stay in the QSM mask (enclosed by signal), with
    a completed local field and a susceptibility value; the sidecars, the residual map and the report's panel say so."""
    _, out, _, planted = processed

    def path(datatype, tail):
        return out / "sub-01/ses-1" / datatype / f"sub-01_ses-1_{tail}"

    def load(datatype, tail):
        return np.asarray(nib.load(path(datatype, tail)).dataobj)

    brain = load("anat", "desc-brain_mask.nii.gz") > 0
    reliable = load("anat", "desc-reliable_mask.nii.gz") > 0
    qsm = load("anat", "desc-qsm_mask.nii.gz") > 0
    residual = load("fmap", "desc-echofit_residual.nii.gz")
    jumpy, dark = planted
    assert nib.load(path("anat", "desc-reliable_mask.nii.gz")).get_data_dtype() == np.uint8
    assert brain[jumpy] and brain[dark] and not reliable[jumpy] and not reliable[dark] and qsm[jumpy] and qsm[dark]
    assert residual[jumpy] > 0.5 > np.median(residual[brain])
    assert not (reliable & ~brain).any() and not (qsm & ~brain).any()
    local = load("fmap", "desc-local_fieldmap.nii.gz")
    chi = load("anat", "Chimap.nii.gz")
    assert local[jumpy] != 0 and local[dark] != 0 and chi[jumpy] != 0 and chi[dark] != 0
    excluded = int((brain & ~reliable).sum())
    assert excluded >= 2

    sidecar = json.loads(path("anat", "desc-reliable_mask.json").read_text())
    assert sidecar["MinSignalFraction"] == 0.15 and sidecar["MaxResidualRad"] == 0.1
    assert sidecar["UnreliableVoxelsExcluded"] == excluded
    assert sidecar["UnreliableFractionOfBrain"] == pytest.approx(excluded / brain.sum(), abs=1e-6)
    assert sidecar["Type"] == "ROI" and sidecar["SkullStripped"] is True and "Reliability map" in sidecar["Description"]
    assert sidecar["Sources"] == ["bids::sub-01/ses-1/anat/sub-01_ses-1_desc-brain_mask.nii.gz",
                                  "bids::sub-01/ses-1/fmap/sub-01_ses-1_desc-total_magnitude.nii.gz",
                                  "bids::sub-01/ses-1/fmap/sub-01_ses-1_desc-echofit_residual.nii.gz"]
    assert sidecar["SpatialReference"].startswith("bids:raw:sub-01/ses-1/anat/")
    assert sidecar["BackgroundFieldRemoval"]["UnreliableVoxelsExcluded"] == excluded
    chimap_sidecar = json.loads(path("anat", "Chimap.json").read_text())["BackgroundFieldRemoval"]
    assert chimap_sidecar["CompletedVoxels"] >= 2
    assert "inverted with the rest" in chimap_sidecar["UnreliableVoxels"]
    residual_sidecar = json.loads(path("fmap", "desc-echofit_residual.json").read_text())
    assert residual_sidecar["Units"] == "rad" and "TotalField" in residual_sidecar
    assert "BackgroundFieldRemoval" not in residual_sidecar
    for datatype, tail in (("anat", "desc-qsm_mask.json"), ("fmap", "desc-local_fieldmap.json")):
        # both were made from the reliability map
        sources = json.loads(path(datatype, tail).read_text())["Sources"]
        assert "bids::sub-01/ses-1/anat/sub-01_ses-1_desc-reliable_mask.nii.gz" in sources, tail
    assert {"*_residual.nii.gz", "*_residual.json"} <= set((out / ".bidsignore").read_text().splitlines())

    text = (out / "sub-01_ses-1.html").read_text()
    figure = "sub-01/figures/sub-01_ses-1_desc-reliability_mask.png"
    assert f'<img src="{figure}"' in text and (out / figure).is_file()
    caption = text[text.index(figure):].split("</figcaption>")[0]
    assert f"<b>{excluded} voxels ({100 * excluded / brain.sum():.2f}% of the brain mask) were excluded</b>" \
        in caption
    assert "below 0.15 × its median" in caption and "above 0.1 rad" in caption
    assert f"<td>Reliability map</td><td>{excluded} voxels of the brain mask excluded from background removal's fit" \
        in text
    assert "sub-01_ses-1_desc-reliable_mask.nii.gz</a>" in text and "sub-01_ses-1_desc-echofit_residual.nii.gz</a>" \
        in text  # in the run's file list
    assert "above 0.1 rad were considered unreliable" in text  # the methods paragraph
    assert "their local field was completed" in text


def test_report_statistics_match_the_maps(processed):
    _, out, report, _ = processed
    anat = out / "sub-01/ses-2/anat"
    chi = nib.load(anat / "sub-01_ses-2_Chimap.nii.gz").get_fdata()
    qsm = nib.load(anat / "sub-01_ses-2_desc-qsm_mask.nii.gz").get_fdata() > 0
    expected = f"SD {chi[qsm].std():.4f} ppm"
    assert expected in (out / "sub-01_ses-2.html").read_text()
    assert "oblique slab tilted 20" not in report.read_text()  # said on the figure, not in the HTML
    images = load_run_images({"chimap": anat / "sub-01_ses-2_Chimap.nii.gz"})
    assert images.oblique_deg == pytest.approx(20.0, abs=0.1)


def test_unprocessed_runs_are_listed(processed):
    bids_dir, out, _, _ = processed
    text = write_subject_report(out, "02", bids_dir).read_text()
    assert "sub-02" in text and "no output" in text and ".png" not in text
    with pytest.raises(ValueError, match="no derivatives"):
        write_subject_report(out, "02")


def test_rewriting_gives_identical_files(processed):
    bids_dir, out, report, _ = processed
    before = {p: p.read_bytes() for p in [report, *sorted((out / "sub-01" / "figures").iterdir())]}
    write_subject_report(out, "01", bids_dir)
    assert {p: p.read_bytes() for p in before} == before


def test_checks_flag_extreme_susceptibility_and_sidecar_warnings(processed, tmp_path):
    _, out, _, _ = processed
    original = find_run_outputs(out, "01")[0]
    _, baseline = run_checks(original, load_run_images(original.paths))
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    anat = copy / "sub-01/ses-1/anat"
    chimap = nib.load(anat / "sub-01_ses-1_Chimap.nii.gz")
    nib.save(nib.Nifti1Image(chimap.get_fdata() * 50, chimap.affine, chimap.header),
             anat / "sub-01_ses-1_Chimap.nii.gz")
    sidecar = json.loads((anat / "sub-01_ses-1_Chimap.json").read_text())
    sidecar["DipoleInversion"]["Warnings"] = ["threshold below the noise floor"]
    (anat / "sub-01_ses-1_Chimap.json").write_text(json.dumps(sidecar))
    run = find_run_outputs(copy, "01")[0]
    stats, warnings = run_checks(run, load_run_images(run.paths))
    assert stats["chi_extreme_fraction"] > 0.005
    added = [w for w in warnings if w not in baseline]
    assert len(added) == 2 and f"+-{CHI_EXTREME_PPM:g} ppm" in added[0], added
    assert added[1] == "DipoleInversion: threshold below the noise floor"
    text = write_subject_report(copy, "01").read_text()
    assert "threshold below the noise floor" in text and f"{len(warnings)} warnings" in text


def test_orientation_follows_the_affine(tmp_path):
    """A marker at the subject's right-posterior, stored in LPS order, is drawn right and at the bottom."""
    data = np.zeros((20, 24, 10), np.float32)
    data[2:5, 18:21, 4:6] = 1.0
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])  # i runs right to left, j anterior to posterior
    lps[:3, 3] = [19.0, 23.0, -15.0]
    path = tmp_path / "chi.nii.gz"
    nib.save(nib.Nifti1Image(data, lps), path)
    world = lps @ np.array([3.0, 19.0, 4.5, 1.0])
    assert world[0] > 0 and world[1] < 0  # right (+x) and posterior (-y) in RAS world coordinates
    images = load_run_images({"chimap": path})
    axial = section(images.chimap, "axial", int(np.argwhere(images.chimap > 0)[:, 2].mean()))
    rows, cols = np.nonzero(axial)
    # neurological display (subject's right on the right), anterior up: row 0 is drawn at the bottom
    assert cols.mean() > axial.shape[1] / 2 and rows.mean() < axial.shape[0] / 2
    coronal = section(images.chimap, "coronal", int(np.argwhere(images.chimap > 0)[:, 1].mean()))
    assert np.nonzero(coronal)[1].mean() > coronal.shape[1] / 2  # right on the right in the coronal view too
    assert images.zooms_mm == (2.0, 2.0, 3.0)


def test_overview_of_a_run_without_maps(tmp_path):
    """Missing maps leave labelled empty panels instead of failing."""
    magnitude = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32)
    ranges = plot_overview(RunImages(magnitude=magnitude), tmp_path / "x.png")
    assert ranges["chimap"] == (-0.15, 0.15) and Image.open(tmp_path / "x.png").size[0] > 500


def test_group_report(processed):
    bids_dir, out, _, _ = processed
    path = write_group_report(out, bids_dir, failures={"sub-02": "TotalField failed: NaN in phase"})
    text = path.read_text()
    tsv = (out / "group_summary.tsv").read_text().splitlines()
    processed_rows = [row.split("\t") for row in tsv[1:] if "\tprocessed\t" in row]
    assert len(processed_rows) == 2
    for row in processed_rows:  # the group summary's means, per run
        assert f"<td>{row[1]}</td><td>processed</td>" in text and f"{row[5]} ± {row[6]}" in text
    assert "failed</span>: TotalField failed: NaN in phase" in text and "2 processed, 1 failed" in text
    assert "not processed" in write_group_report(out, bids_dir).read_text()
    for link in _links(path):
        page, _, anchor = link.partition("#")
        assert (out / page).is_file(), link
        assert not anchor or f'id="{anchor}"' in (out / page).read_text(), link


def test_reports_keep_the_dataset_valid(processed, bids_validator):
    _, out, _, _ = processed
    result = subprocess.run([bids_validator, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_chromium(processed, tmp_path):
    _, out, report, _ = processed
    png = tmp_path / "page.png"
    result = subprocess.run([sys.executable, str(RENDER), str(report), "--png", str(png), "--height", "3000"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    pixels = np.asarray(Image.open(png).convert("L"))
    assert (pixels < 30).mean() > 0.05  # the figures' black panels are on the page: the images loaded


def test_single_echo_methods_say_what_was_done_and_cite_the_paper_as_it_gives_itself():
    sidecar = {"EchoTime": [0.004], "TotalField": {"Method": "Laplacian unwrapping of a single echo, divided by 2*pi*TE"},
               "BrainMask": {"Method": "magnitude threshold + morphology (metaqsm brain_mask)",
                             "Input": "root-sum-of-squares magnitude over echoes"},
               "DipoleInversion": {"Method": "tkd", "Threshold": 0.2}}
    (text,), references = number_citations([methods_paragraph(sidecar)])
    assert "from 1 echo (TE = 4 ms)" in text and "estimated from the single echo by Laplacian unwrapping" in text
    assert "could not be removed" in text and "all echoes" not in text and "removes the phase offset" not in text
    assert "(magnitude threshold and morphology)." in text and "brain_mask" not in text
    assert "(threshold 0.2)" in text
    multi, _ = methods_paragraph({**sidecar, "EchoTime": [0.004, 0.008], "TotalField": {"Method": "fit"}})
    assert "estimated from all 2 echoes by fit" in multi and "removes the phase offset at TE = 0" in multi
    paper = references[0][1]
    assert paper.startswith("Meta-QSM: An Image-Resolution-Arbitrary Network for QSM Reconstruction.")
    assert "Kevin M. Koch" in paper


def test_reliability_slice_titles_do_not_overlap(tmp_path, monkeypatch):
    """Six slices of a 160-slice run with ten thousand excluded voxels each: no two column titles overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = np.indices((240, 240, 160), sparse=True)
    brain = ((grid[0] - 120) ** 2 + (grid[1] - 120) ** 2) / 115 ** 2 + (grid[2] - 80) ** 2 / 75 ** 2 < 1
    reliable = brain & ~((grid[0] % 2 == 0) & (grid[2] >= 100))  # 5-digit counts in 3-digit slices
    magnitude = np.where(brain, 1.0, 0.1).astype(np.float32)
    images = RunImages(magnitude=magnitude, brain_mask=brain, reliable_mask=reliable,
                       fit_residual=np.zeros(brain.shape, np.float32), zooms_mm=(1.0, 1.0, 1.0))
    saved = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda fig, *args, **kwargs: (saved.append(fig), original(fig, *args, **kwargs)))
    from metaqsm_bids.reports.figures import plot_reliability

    assert len(plot_reliability(images, tmp_path / "r.png", title="sub-01")) == 6
    renderer = FigureCanvasAgg(saved[0]).get_renderer()
    boxes = sorted((ax.title.get_window_extent(renderer) for ax in saved[0].axes if ax.get_title()),
                   key=lambda box: box.x0)
    assert len(boxes) == 6 and all("excluded" in ax.get_title() for ax in saved[0].axes if ax.get_title())
    assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:])), [(b.x0, b.x1) for b in boxes]
    above = [text.get_window_extent(renderer) for text in saved[0].texts]  # the figure's title and note
    assert len(above) == 2 and max(b.y1 for b in boxes) < min(b.y0 for b in above)


@pytest.mark.slow
def test_report_says_each_warning_once_and_no_value_as_python(tmp_path):
    """Three input problems (unknown vendor, no ImagingFrequency, no phase Units): three console warnings, each
    once in the report, in the sidecars' words (files as BIDS URIs); no parameter shown as a Python literal."""
    from html import escape

    bids_dir, out = tmp_path / "bids", tmp_path / "out"
    simulate_dataset(bids_dir, [RunSpec("01", shape=(32, 32, 16), voxel_size_mm=(2.0, 2.0, 3.0), seed=4)])
    for sidecar in (bids_dir / "sub-01" / "anat").glob("*_MEGRE.json"):
        meta = {k: v for k, v in json.loads(sidecar.read_text()).items() if k not in ("ImagingFrequency", "Units")}
        sidecar.write_text(json.dumps({**meta, "Manufacturer": "Acme Imaging"}))
    result = run_cli("metaqsm", bids_dir, out, "participant", "-w", tmp_path / "work", "--nprocs", "1",
                     "--inversion", "tkd", "--bipolar", "on")
    assert result.returncode == 0, result.stderr[-3000:]
    console = [line.split(" WARNING: ", 1)[1] for line in result.stderr.splitlines() if " WARNING: " in line]
    assert len(console) == 3, result.stderr
    chimap = json.loads((out / "sub-01" / "anat" / "sub-01_Chimap.json").read_text())
    assert chimap["Warnings"] == [w.replace(f"{bids_dir.resolve()}/", "bids:raw:") for w in console]
    html = (out / "sub-01.html").read_text()
    assert "<b>3 warnings</b>" in html
    for warning in chimap["Warnings"]:
        assert html.count(escape(warning)) == 1, warning
    parameters = html[html.index("<h3>Parameters and versions</h3>"):]
    assert "BipolarCorrection" in parameters
    # a dict's braces and quoted keys, Python's constants, a negative zero
    assert not re.search(r"[{}]|&#x27;:|\bTrue\b|\bFalse\b|\bNone\b|-0(?![.\d])", parameters), parameters
