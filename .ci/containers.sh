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
# run skips mmdebstrap; podman's layer cache makes the second build fast (METAQSM_CI_NO_CACHE=1: a cold
# build, without it). METAQSM_CI_WORK: where the datasets and outputs go (default: a new folder in
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
CHI_TOL=${METAQSM_CI_CHI_TOL:-1e-5}
export CONTAINERS_CONF=$ROOT/.ci/containers.conf
# OpenBLAS picks its kernels by the CPU it detects unless OPENBLAS_CORETYPE says (some machines set it): the
# containers get this environment's OPENBLAS_* so that they run the pip run's kernels; with other kernels the
# rounding differs and PDF's float32 CG carries it to 0.008 ppm in the demo's Chimap (Haswell against SkylakeX)
BLAS_ENV=()
for var in $(compgen -e | grep '^OPENBLAS_' || true); do BLAS_ENV+=(-e "$var"); done
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
        nice -n 10 mmdebstrap --quiet --format=tar --variant=minbase --include=ca-certificates bookworm \
            "$CACHE/debian-bookworm.tar.part"
        mv "$CACHE/debian-bookworm.tar.part" "$CACHE/debian-bookworm.tar"
    fi
    podman import --quiet "$CACHE/debian-bookworm.tar" "$BASE" >/dev/null
fi
took "base image" "$t"

# --- the image: the repository's Dockerfile with the CPU build arguments ------------------------------
# pip inside the build gets this machine's pip configuration (one merged pip.conf) and the wheel
# folders and CA bundle it names, mounted read-only for the build only.
t=$(now)
# the image this build replaces: removed after it, so repeated runs do not fill the disk (2 GB each)
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
mkdir -p "$WORK/pip"
mounts=()
while read -r mount; do mounts+=(-v "$mount"); done < <(python3 .ci/pip_mounts.py "$WORK/pip")
nice -n 10 podman build --quiet ${METAQSM_CI_NO_CACHE:+--no-cache} --build-arg BASE_IMAGE="$BASE" --build-arg REQUIRE_CUDA_TORCH=0 \
    --build-arg TEMPLATES= "${mounts[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; fail "podman build"; }
took "podman build" "$t"
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
    podman rmi --force "$previous" >/dev/null 2>&1 || say "could not remove the previous image $previous"
fi
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
    # and the test tools used here: the validator, and nilearn (its MNI152 files) with pytest for tests/conftest.py
    { pip install torch==2.13.0 && pip install . bids-validator-deno nilearn pytest; } >"$WORK/pip-install.log" 2>&1 \
        || { tail -20 "$WORK/pip-install.log"; fail "pip install"; }
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
podman run --rm -u "$RUN_AS" "${BLAS_ENV[@]}" -v "$WORK/demo_bids:/data/bids:ro" -v "$WORK/out:/data/out" "$IMAGE" \
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

# the outputs: GeneratedBy, the same files and maps as the pip run, the validator
python3 "$ROOT/.ci/check_outputs.py" out pip_out docker "$VERSION" "$CHI_TOL"

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

# --output-spaces with a TEMPLATEFLOW_HOME mounted read-only over the image's (built here without
# templates: templateflow's archive is out of reach), made as the template tests make it from nilearn's
# copy of MNI152NLin2009aSym
t=$(now)
python3 -c "import sys; sys.path.insert(0, sys.argv[1]); from tests.conftest import make_templateflow_home; \
make_templateflow_home(sys.argv[2], (2,))" "$ROOT" templateflow
chmod -R a+rX templateflow
mkdir space_out
chown "$RUN_AS" space_out
podman run --rm -u "$RUN_AS" -v "$WORK/demo_bids:/data/bids:ro" -v "$WORK/templateflow:/opt/templateflow:ro" \
    -v "$WORK/space_out:/data/out" "$IMAGE" /data/bids /data/out participant --participant-label 01 \
    --output-spaces orig MNI152NLin2009aSym:res-2 >space.log 2>&1 || { cat space.log; fail "--output-spaces in the container"; }
took "podman run, participant 01 with --output-spaces" "$t"
python3 "$ROOT/.ci/check_outputs.py" --space MNI152NLin2009aSym space_out

# --- the Singularity/Apptainer image: singularity/metaqsm.def from the Docker image ----------------
# Apptainer is not packaged for bookworm; Debian's unstable has it (it needs a newer libc), so it runs in
# a podman container of an unstable root file system (mmdebstrap, cached), privileged and as a non-root
# user. The definition's "Bootstrap: docker-daemon" reads the image from podman's Docker-compatible
# socket. Where apptainer cannot run here, this says why and skips.
skip_sif() { say "SKIPPED the Singularity image: $*"; TIMES+=("Singularity image: skipped"); }
sif_step() {
    local apptainer=localhost/apptainer:unstable sif="metaqsm-$VERSION.sif" t
    t=$(now)
    if ! podman image exists "$apptainer"; then
        if [ ! -s "$CACHE/apptainer-unstable.tar" ]; then
            say "mmdebstrap: Debian unstable with apptainer into $CACHE"
            if ! nice -n 10 mmdebstrap --quiet --format=tar --variant=minbase \
                    --aptopt='Acquire::Check-Valid-Until "false"' \
                    --include=apptainer,squashfs-tools,squashfuse,fuse2fs,ca-certificates \
                    unstable "$CACHE/apptainer-unstable.tar.part" http://deb.debian.org/debian >mmdebstrap.log 2>&1; then
                skip_sif "mmdebstrap of Debian unstable with apptainer failed: $(tail -3 mmdebstrap.log)"
                return
            fi
            mv "$CACHE/apptainer-unstable.tar.part" "$CACHE/apptainer-unstable.tar"
        fi
        podman import --quiet "$CACHE/apptainer-unstable.tar" "$apptainer" >/dev/null
    fi
    took "apptainer image" "$t"
    mkdir -p sif/home sif/probe sif_out
    tar -xf "$CACHE/debian-bookworm.tar" -C sif/probe 2>/dev/null || true
    chown "$RUN_AS" sif sif/home sif_out
    # apptainer as the user RUN_AS: podman starts the container as root, which opens the container's copy
    # of /dev/fuse (this machine's is root-only, 0600; Debian's default is 0666) and gives the user a
    # passwd entry, then drops to the user
    local uid=${RUN_AS%:*} gid=${RUN_AS#*:}
    local as_user="chmod 666 /dev/fuse 2>/dev/null; echo 'user:x:$uid:$gid::/sif/home:/bin/sh' >>/etc/passwd; \
echo 'user:x:$gid:' >>/etc/group; exec setpriv --reuid=$uid --regid=$gid --clear-groups \"\$@\""
    apptainer_run() {  # apptainer_run [podman options] -- apptainer arguments
        local options=()
        while [ "$1" != -- ]; do options+=("$1"); shift; done
        shift
        podman run --rm --privileged "${BLAS_ENV[@]}" -e HOME=/sif/home -w /sif/home -v "$WORK/sif:/sif" "${options[@]}" \
            "$apptainer" sh -c "$as_user" sh apptainer "$@"
    }
    # can apptainer run a container here at all? (a directory of Debian's base as the image)
    if ! apptainer_run -- exec /sif/probe true >probe.log 2>&1; then
        skip_sif "apptainer cannot run a container on this machine: $(cat probe.log)"
        return
    fi
    say "$(apptainer_run -- --version) runs here"

    # the image as Docker holds it: docker.io/library/metaqsm:VERSION, served on a Docker socket
    podman tag "$IMAGE" "docker.io/library/metaqsm:$VERSION"
    podman system service --time=0 "unix://$WORK/podman.sock" >service.log 2>&1 &
    service=$!
    trap 'kill "$service" 2>/dev/null || true' EXIT
    for _ in $(seq 50); do [ -S "$WORK/podman.sock" ] && break; sleep 0.2; done
    chmod 666 "$WORK/podman.sock"
    t=$(now)
    apptainer_run -v "$ROOT/singularity/metaqsm.def:/sif/metaqsm.def:ro" \
        -v "$WORK/podman.sock:/var/run/docker.sock" -- build "/sif/$sif" /sif/metaqsm.def >sif-build.log 2>&1 \
        || { cat sif-build.log; fail "apptainer build of singularity/metaqsm.def"; }
    kill "$service"
    wait "$service" 2>/dev/null || true
    trap - EXIT
    took "apptainer build" "$t"
    say "$sif: $(($(stat -c %s "sif/$sif") / 1000000)) MB; its %test: $(grep -E '^metaqsm |templates in the image' sif-build.log | tr '\n' ' ')"

    t=$(now)
    apptainer_run -v "$WORK/demo_bids:/w/bids:ro" -v "$WORK/sif_out:/w/out" -- \
        run -B /w/bids:/data/bids:ro -B /w/out:/data/out "/sif/$sif" /data/bids /data/out participant \
        >sif-run.log 2>&1 || { cat sif-run.log; fail "apptainer run, participant"; }
    took "apptainer run, participant" "$t"
    t=$(now)
    apptainer_run -v "$WORK/demo_bids:/w/bids:ro" -v "$WORK/sif_out:/w/out" -- \
        run -B /w/bids:/data/bids:ro -B /w/out:/data/out "/sif/$sif" /data/bids /data/out group \
        >>sif-run.log 2>&1 || { cat sif-run.log; fail "apptainer run, group"; }
    took "apptainer run, group" "$t"
    grep -E "OK|FAILED|wrote" sif-run.log
    python3 "$ROOT/.ci/check_outputs.py" sif_out pip_out singularity "$VERSION" "$CHI_TOL"
    checksums demo_bids | cmp -s bids.before - || fail "the input dataset changed in the apptainer run"
}
sif_step
cd "$ROOT"

say "times:"
printf '  %s\n' "${TIMES[@]}"
[ -z "${REMOVE_WORK:-}" ] || rm -rf "$WORK"
