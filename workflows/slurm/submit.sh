#!/usr/bin/env bash
# Submit metaqsm as a SLURM array, one participant per task, or resubmit the ones that failed.
#
#   submit.sh [options] BIDS_DIR OUT_DIR [-- METAQSM_OPTIONS...]
#
# Options:
#   --participants "01 02"  participants to run (default: participants.tsv, else the sub-* folders)
#   --retry-failed          only those without a successful run yet: failed, killed (time or memory
#                           limit) or never run; those still queued or running are left alone
#   --state-dir DIR         participant lists, logs/, status/ (default: OUT_DIR_slurm)
#   --work-dir DIR          nipype work dirs, one per participant (default: STATE_DIR/work)
#   --sbatch-args "..."     more sbatch options, e.g. "--partition=gpu --time=4:00:00", or
#                           "--gres=none" on a cluster without GPUs
#   --wait                  wait for the array to end, print every participant's state, and exit 0
#                           only if all of them succeeded
#   --dry-run               print what would be submitted, submit nothing
# Environment:
#   METAQSM_RUNNER  singularity (default), apptainer, or native (the metaqsm on PATH, or METAQSM_CMD)
#   METAQSM_SIF     the image for singularity/apptainer, e.g. /images/metaqsm-0.1.0.sif
#   METAQSM_POLL_S  seconds between queue checks with --wait (default 30)
#
# Each task writes STATE_DIR/logs/<jobid>_<task>.log (linked as logs/sub-<label>.log) and
# STATE_DIR/status/sub-<label>: one line "queued|running|ok|failed job=... exit=... log=...".
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "submit.sh: $*" >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
participants=() retry=0 state_dir="" work_dir="" sbatch_args="" wait=0 dry_run=0 positional=() metaqsm_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --participants) read -r -a participants <<< "${2:?}"; shift 2 ;;
        --retry-failed) retry=1; shift ;;
        --state-dir) state_dir=${2:?}; shift 2 ;;
        --work-dir) work_dir=${2:?}; shift 2 ;;
        --sbatch-args) sbatch_args=${2?}; shift 2 ;;
        --wait) wait=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage ;;
        --) shift; metaqsm_args=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) positional+=("$1"); shift ;;
    esac
done
[ ${#positional[@]} = 2 ] || usage 2
bids_dir=$(realpath -e "${positional[0]}") || die "${positional[0]}: no such BIDS dataset"
[ -f "$bids_dir/dataset_description.json" ] || die "$bids_dir: no dataset_description.json (not a BIDS dataset)"
out_dir=$(realpath -m "${positional[1]}")
state_dir=$(realpath -m "${state_dir:-${out_dir}_slurm}")
work_dir=$(realpath -m "${work_dir:-$state_dir/work}")
runner=${METAQSM_RUNNER:-singularity}
case "$runner" in
    native)
        command -v "${METAQSM_CMD:-metaqsm}" >/dev/null \
            || die "METAQSM_RUNNER=native: ${METAQSM_CMD:-metaqsm} is not on PATH" ;;
    singularity|apptainer)
        [ -f "${METAQSM_SIF:-}" ] \
            || die "METAQSM_SIF='${METAQSM_SIF:-}' is not a file: point it at the metaqsm .sif image" \
                   "(or set METAQSM_RUNNER=native)"
        METAQSM_SIF=$(realpath "$METAQSM_SIF") ;;
    *) die "METAQSM_RUNNER=$runner: use singularity, apptainer or native" ;;
esac

if [ ${#participants[@]} = 0 ]; then
    if [ -f "$bids_dir/participants.tsv" ]; then  # the participant_id column, wherever it is
        mapfile -t participants < <(awk -F'\t' '
            {sub(/\r$/, "")}
            NR == 1 {for (i = 1; i <= NF; i++) if ($i == "participant_id") c = i; next}
            c && $c != "" {print $c}' "$bids_dir/participants.tsv")
    else
        mapfile -t participants < <(find "$bids_dir" -mindepth 1 -maxdepth 1 -type d -name 'sub-*' -printf '%f\n' \
                                    | sort)
    fi
fi
participants=("${participants[@]#sub-}")
[ ${#participants[@]} -gt 0 ] || die "no participants found in $bids_dir (participants.tsv or sub-* folders)"

in_queue() { [ -n "$(squeue -h -j "$1" -o %i 2>/dev/null)" ]; }  # pending or running

status_of() {  # "<state> <job>" of a participant, "none -" without a status file
    local line
    line=$(cat "$state_dir/status/sub-$1" 2>/dev/null) || { echo "none -"; return; }
    echo "${line%% *} $(sed -n 's/.* job=\([^ ]*\).*/\1/p' <<< "$line")"
}

if [ "$retry" = 1 ]; then
    selected=()
    for label in "${participants[@]}"; do
        read -r state job < <(status_of "$label")
        case "$state" in
            ok) ;;
            queued|running)
                if in_queue "$job"; then echo "sub-$label: still $state as job $job, not resubmitted" >&2
                else echo "sub-$label: $state as job $job, which ended without a result (killed?): resubmitting" >&2
                     selected+=("$label"); fi ;;
            *) selected+=("$label") ;;
        esac
    done
    participants=("${selected[@]+"${selected[@]}"}")
    if [ ${#participants[@]} = 0 ]; then echo "nothing to resubmit: every participant has a successful run"; exit 0; fi
fi

n=${#participants[@]}
read -r -a extra_sbatch <<< "$sbatch_args"
sbatch_cmd=(sbatch --parsable --hold --array="0-$((n - 1))" --output="$state_dir/logs/%A_%a.log"
            --export=ALL "${extra_sbatch[@]+"${extra_sbatch[@]}"}" "$here/metaqsm_array.sbatch")
if [ "$dry_run" = 1 ]; then
    echo "participants (${n}): ${participants[*]}"
    echo "would run: ${sbatch_cmd[*]}"
    echo "with metaqsm options: ${metaqsm_args[*]+"${metaqsm_args[*]}"}"
    exit 0
fi

mkdir -p "$state_dir/logs" "$state_dir/status" "$state_dir/submissions" "$work_dir" "$out_dir"
submission=$(mktemp -d "$state_dir/submissions/$(date +%Y%m%dT%H%M%S)-XXXX")
printf '%s\n' "${participants[@]}" > "$submission/participants.txt"
: > "$submission/metaqsm_args.txt"
[ ${#metaqsm_args[@]} = 0 ] || printf '%s\n' "${metaqsm_args[@]}" > "$submission/metaqsm_args.txt"
export METAQSM_BIDS_DIR="$bids_dir" METAQSM_OUT_DIR="$out_dir" METAQSM_STATE_DIR="$state_dir" \
       METAQSM_WORK_DIR="$work_dir" METAQSM_SUBMISSION="$submission" METAQSM_RUNNER="$runner"
[ -z "${METAQSM_SIF:-}" ] || export METAQSM_SIF

# held until every participant is marked queued, so that no task's status is overwritten
job_id=$("${sbatch_cmd[@]}")
job_id=${job_id%%;*}
for i in "${!participants[@]}"; do
    echo "queued job=${job_id}_$i exit=- time=$(date -Iseconds) log=$state_dir/logs/${job_id}_$i.log" \
        > "$state_dir/status/sub-${participants[$i]}"
done
echo "$job_id" > "$submission/job_id"
scontrol release "$job_id"
echo "submitted array job $job_id: $n participant(s) (${participants[*]}); logs in $state_dir/logs"

[ "$wait" = 1 ] || exit 0
while in_queue "$job_id"; do sleep "${METAQSM_POLL_S:-30}"; done
failed=0
for label in "${participants[@]}"; do
    line=$(cat "$state_dir/status/sub-$label")
    echo "sub-$label: $line"
    [ "${line%% *}" = ok ] || failed=1
done
exit "$failed"
