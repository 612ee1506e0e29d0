#!/usr/bin/env bash
# The BIDS App's container, built and run for real on a machine without a Docker engine or an image
# registry (Debian bookworm, root): podman from Debian's archive, a Debian base made locally with
# mmdebstrap, the repository's Dockerfile built with the CPU build arguments, then the demo run INSIDE
# the image exactly as the README tells users (non-root, read-only input mount), compared with the
# pip-installed run. Then the Singularity/Apptainer image from singularity/metaqsm.def (it skips, saying
# why, where apptainer cannot run). Every step prints its time; the summary repeats them.
#
#   bash .ci/containers.sh
#
# METAQSM_CI_CACHE (default /var/cache/metaqsm-ci): the base root file systems, kept so that a second
# run skips mmdebstrap. METAQSM_CI_WORK: where the datasets and outputs go (default: a new folder in
# /tmp, removed after a successful run). Uses the active virtual environment when it has metaqsm
# installed from this checkout (as .ci/run leaves it), else makes one the README's way.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSION=$(sed -n 's/^version = //p' setup.cfg)
IMAGE=localhost/metaqsm:$VERSION
BASE=localhost/debian-base:bookworm
CACHE=${METAQSM_CI_CACHE:-/var/cache/metaqsm-ci}
WORK=${METAQSM_CI_WORK:-}
[ -n "$WORK" ] || { WORK=$(mktemp -d /tmp/metaqsm-containers.XXXXXX); REMOVE_WORK=1; }
# the user the README's `-u "$(id -u):$(id -g)"` stands for: this one, or a non-root one when run as root
if [ "$(id -u)" = 0 ]; then RUN_AS=1000:1000; else RUN_AS="$(id -u):$(id -g)"; fi
# Chimap of the container vs the pip run: largest |difference| in ppm allowed (measured: see the README)
CHI_TOL=${METAQSM_CI_CHI_TOL:-1e-4}
export CONTAINERS_CONF=$ROOT/.ci/containers.conf
mkdir -p "$CACHE" "$WORK"

TIMES=()
now() { date +%s.%N; }
took() {  # took NAME START: print and remember the seconds since START
    local seconds
    seconds=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$2" "$(now)")
    echo "[containers] $1: ${seconds} s"
    TIMES+=("$1: ${seconds} s")
}
fail() { echo "[containers] FAILED: $*" >&2; exit 1; }
say() { echo "[containers] $*"; }

# --- tools, from Debian's archive -------------------------------------------------------------------
t=$(now)
need=()
for tool in podman buildah mmdebstrap runc newuidmap fuse-overlayfs mksquashfs; do
    command -v "$tool" >/dev/null || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || fail "missing ${need[*]}: install podman buildah mmdebstrap runc uidmap fuse-overlayfs squashfs-tools (as root)"
    say "installing podman and friends from Debian's archive (missing: ${need[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman buildah mmdebstrap \
        runc uidmap fuse-overlayfs squashfs-tools slirp4netns containernetworking-plugins iptables >/dev/null
fi
podman --version
took "tools" "$t"

# --- the Debian base (no registry: made with mmdebstrap from the archive apt uses; cached) -----------
t=$(now)
if ! podman image exists "$BASE"; then
    if [ ! -s "$CACHE/debian-bookworm.tar" ]; then
        say "mmdebstrap: a minimal bookworm root file system into $CACHE"
        nice -n 10 mmdebstrap --quiet --variant=minbase --include=ca-certificates bookworm "$CACHE/debian-bookworm.tar.part"
        mv "$CACHE/debian-bookworm.tar.part" "$CACHE/debian-bookworm.tar"
    fi
    podman import --quiet "$CACHE/debian-bookworm.tar" "$BASE" >/dev/null
fi
took "base image" "$t"

# --- the image: the repository's Dockerfile with the CPU build arguments ------------------------------
# pip inside the build gets this machine's pip configuration (one merged pip.conf) and the wheel
# folders and CA bundle it names, mounted read-only for the build only.
t=$(now)
mkdir -p "$WORK/pip"
mounts=()
while read -r mount; do mounts+=(-v "$mount"); done < <(python3 .ci/pip_mounts.py "$WORK/pip")
nice -n 10 podman build --quiet --build-arg BASE_IMAGE="$BASE" --build-arg REQUIRE_CUDA_TORCH=0 \
    --build-arg TEMPLATES= "${mounts[@]}" -t "$IMAGE" . >/dev/null
took "podman build" "$t"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "image $IMAGE: $((size / 1000000)) MB"
[ "$(podman run --rm "$IMAGE" --version)" = "metaqsm $VERSION" ] || fail "the image's metaqsm --version"

# --- the pip-installed reference ---------------------------------------------------------------------
t=$(now)
if (cd / && python3 -c "import metaqsm_bids, sys; sys.exit(not metaqsm_bids.__file__.startswith('$ROOT/'))") 2>/dev/null \
        && [ -x "$(dirname "$(command -v python3)")/metaqsm" ]; then
    say "pip run with the active environment ($(command -v metaqsm))"
else
    say "pip run: a new virtual environment, installed as the README says"
    python3 -m venv "$WORK/venv"
    . "$WORK/venv/bin/activate"
    pip install --quiet torch==2.13.0 && pip install --quiet . bids-validator-deno
fi
took "pip install" "$t"

cd "$WORK"
t=$(now)
metaqsm-simulate demo_bids >/dev/null
chmod -R a+rX demo_bids
took "metaqsm-simulate demo_bids" "$t"

t=$(now)
metaqsm demo_bids pip_out participant -w pip_work >pip.log 2>&1 || { cat pip.log; fail "the pip run"; }
took "pip run, participant" "$t"

# --- the BIDS App inside the image, as the README runs it --------------------------------------------
checksums() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum) }
checksums demo_bids >bids.before
mkdir out
chown "$RUN_AS" out
t=$(now)
podman run --rm -u "$RUN_AS" -v "$WORK/demo_bids:/data/bids:ro" -v "$WORK/out:/data/out" "$IMAGE" \
    /data/bids /data/out participant >container.log 2>&1 || { cat container.log; fail "the container's participant run"; }
took "podman run, participant" "$t"
t=$(now)
podman run --rm -u "$RUN_AS" -v "$WORK/demo_bids:/data/bids:ro" -v "$WORK/out:/data/out" "$IMAGE" \
    /data/bids /data/out group >group.log 2>&1 || { cat group.log; fail "the container's group run"; }
took "podman run, group" "$t"
cat container.log group.log

# the input: read-only inside, and untouched
if podman run --rm -u "$RUN_AS" -v "$WORK/demo_bids:/data/bids:ro" --entrypoint sh "$IMAGE" \
        -c 'touch /data/bids/written' 2>ro.log; then
    fail "the input mount is writable"
fi
grep -q "Read-only file system" ro.log || { cat ro.log; fail "writing to the input mount: not the read-only error"; }
checksums demo_bids >bids.after
cmp -s bids.before bids.after || fail "the input dataset changed: $(diff bids.before bids.after | head -5)"
say "input mount: read-only ($(cat ro.log)); its $(wc -l <bids.after) files unchanged"

# the outputs: the validator, GeneratedBy, the same files and maps as the pip run
validator=$(command -v bids-validator-deno || true)
if [ -n "$validator" ]; then
    "$validator" out >validator.log 2>&1 || { cat validator.log; fail "bids-validator-deno on the container's outputs"; }
    say "bids-validator-deno: $(grep -E -i 'error|warning|valid' validator.log | tail -1)"
else
    say "bids-validator-deno is not installed: the outputs are not validated"
fi
python3 - "$VERSION" "$CHI_TOL" <<'EOF'
import json, sys
from pathlib import Path
import nibabel as nib
import numpy as np

version, tol = sys.argv[1], float(sys.argv[2])
generated = json.loads(Path("out/dataset_description.json").read_text())["GeneratedBy"][0]
assert generated["Container"] == {"Type": "docker", "Tag": version}, generated
print(f"[containers] GeneratedBy: {generated['Name']} {generated['Version']}, Container {generated['Container']}")
# group level: the summary and report, one row per participant's run
assert Path("out/group_summary.tsv").exists() and Path("out/group_report.html").exists()
names = lambda root: sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                            if p.is_file() and not p.name.startswith("group_"))
assert names("out") == names("pip_out"), set(names("out")) ^ set(names("pip_out"))
chimaps = sorted(Path("pip_out").rglob("*_Chimap.nii.gz"))
assert len(chimaps) == 2, chimaps
for pip_map in chimaps:
    a = np.asarray(nib.load(pip_map).dataobj, np.float64)
    b = np.asarray(nib.load(Path("out") / pip_map.relative_to("pip_out")).dataobj, np.float64)
    diff = np.abs(a - b).max()
    print(f"[containers] {pip_map.name}: max |container - pip| = {diff:.3g} ppm (max |chi| {np.abs(a).max():.3g} ppm)")
    assert diff <= tol, f"{pip_map.name}: the container's Chimap differs from pip's by {diff} ppm > {tol}"
print(f"[containers] outputs: the same {len(names('out'))} files as the pip run")
EOF

# a broken input: the same one line on the console inside as outside
cp -a demo_bids bad_bids
python3 -c "import sys; p = sys.argv[1]; raw = open(p, 'rb').read(); open(p, 'wb').write(raw[:len(raw) // 2])" \
    bad_bids/sub-02/anat/sub-02_echo-2_part-mag_MEGRE.nii.gz
mkdir bad_out
chown "$RUN_AS" bad_out
set +e
metaqsm bad_bids bad_pip participant --participant-label 02 -w bad_work 2>bad_pip.err >/dev/null
pip_status=$?
podman run --rm -u "$RUN_AS" -v "$WORK/bad_bids:/data/bids:ro" -v "$WORK/bad_out:/data/out" "$IMAGE" \
    /data/bids /data/out participant --participant-label 02 2>bad_container.err >/dev/null
container_status=$?
set -e
sed "s#$WORK/bad_bids#/data/bids#g" bad_pip.err >bad_pip.normalised
[ "$pip_status" = 1 ] && [ "$container_status" = 1 ] || fail "a broken input: exit $pip_status (pip), $container_status (container), not 1"
[ "$(wc -l <bad_container.err)" = 1 ] || { cat bad_container.err; fail "a broken input: not one line in the container"; }
cmp -s bad_pip.normalised bad_container.err || { diff bad_pip.normalised bad_container.err; fail "a broken input: the container's message differs from pip's"; }
say "a broken input, inside as outside: $(cat bad_container.err)"
cd "$ROOT"

say "times:"
printf '  %s\n' "${TIMES[@]}"
[ -z "${REMOVE_WORK:-}" ] || rm -rf "$WORK"
