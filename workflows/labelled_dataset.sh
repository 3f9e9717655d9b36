#!/usr/bin/env bash
# Segment a folder of labelled images and score them together (one pooled confusion matrix).
#
#   workflows/labelled_dataset.sh IMAGES_DIR LABELS_DIR OUT_DIR [agriseg run options...]
#
# Each image IMAGES_DIR/NAME${IMAGE_SUFFIX}.* is paired with LABELS_DIR/NAME${LABEL_SUFFIX}.*
# (first match; NAME is matched literally, brackets and stars included; CWFID's
# 001_image.png and 001_annotation.png: IMAGE_SUFFIX=_image LABEL_SUFFIX=_annotation);
# images without a label are skipped with a message. Only rasters count (tif tiff png jpg jpeg jp2 vrt img bmp webp, any case):
# sidecars such as NAME.pgw, NAME.tfw, NAME.aux.xml are neither images nor labels. Images
# without a CRS (PNG/JPEG tiles) need `--gsd METRES` among the options. Labels coded otherwise
# than 0=soil 1=crop 2=weed 3=disease 255=unlabelled: set TRUTH_CLASSES (e.g.
# TRUTH_CLASSES=0=soil,1=crop,2=weed) or TRUTH_COLORS; PRED_CLASSES merges predicted classes
# (see `agriseg evaluate --help`). Only the class mask is written per image (no indices, zones,
# fields, report). A rerun reuses the images already done with the same options (an
# interrupted evaluation continues) and reruns those done with others. Scores:
# OUT_DIR/scores.txt. `agriseg` comes from PATH (activate its venv: . .venv/bin/activate)
# or from $AGRISEG (e.g. AGRISEG=.venv/bin/agriseg).
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,18p' "$0" >&2; exit 2; }
images=$1 labels=$2 out=$3
[ "$out" = / ] || out=${out%/}
shift 3
# Absolute, so that the options a run is recorded with (run.args, below) do not depend on how
# the folder was written (./imgs and imgs are one folder).
images=$(cd -- "$images" && pwd) || { echo "$images: no such folder of images" >&2; exit 2; }
agriseg=${AGRISEG:-agriseg}
command -v "$agriseg" >/dev/null || {
  echo "$agriseg: command not found; activate agriseg's venv (. .venv/bin/activate) or set" \
    "AGRISEG=/path/to/.venv/bin/agriseg" >&2
  exit 2
}
# Globs that match nothing expand to nothing, not to themselves.
shopt -s nullglob

# Whether $1 is a raster by its extension: GIS sidecars (tile1.pgw sorts before tile1.png,
# .tfw before .tif) were taken for labels and images, and `agriseg run tile1.pgw` stopped the
# whole dataset.
is_raster() {
  local base=${1##*/}
  [[ $base == *.* ]] || return 1
  local ext=${base##*.}
  case "$(printf '%s' "$ext" | tr '[:upper:]' '[:lower:]')" in
    tif|tiff|png|jpg|jpeg|jp2|vrt|img|bmp|webp) return 0 ;;
  esac
  return 1
}

pairs=()
for img in "$images"/*; do
  [ -f "$img" ] && is_raster "$img" || continue
  name=${img##*/}  # not $(basename ...), which drops a name's trailing newlines
  name=${name%.*}
  name=${name%"${IMAGE_SUFFIX:-}"}
  # Only the `.*` is a pattern: the quoted name and folder match literally, so the label of
  # images/tile[1].tif is labels/tile[1].tif, never labels/tile1.tif. Expanded by the shell, not
  # read back as lines of text, so spaces and newlines in names stay intact.
  truth=
  for candidate in "$labels/$name${LABEL_SUFFIX:-}".*; do
    if [ -f "$candidate" ] && is_raster "$candidate"; then truth=$candidate; break; fi
  done
  if [ -z "$truth" ]; then
    echo "no label for $img in $labels, skipped" >&2
    continue
  fi
  # The run's arguments, kept beside it: a rerun with other options (--gsd, --model, --bands)
  # reused the old masks and scored them as the new ones.
  run_args=$(printf '%q ' "$img" "$@")
  done_args=
  if [ -f "$out/$name/run.args" ]; then done_args=$(<"$out/$name/run.args"); fi
  if [ -f "$out/$name/run.json" ] && [ "$done_args" = "$run_args" ]; then
    echo "reusing $out/$name (run with the same options)" >&2
  else
    again=()
    if [ -f "$out/$name/run.json" ]; then
      echo "rerunning $img: $out/$name was run with other options" >&2
      again=(--overwrite)
    fi
    rm -f "$out/$name/run.args"
    "$agriseg" run "$img" --out "$out/$name" --no-indices --no-progress \
      --skip quicklook,zones,fields,report,project ${again[@]+"${again[@]}"} "$@"
    printf '%s' "$run_args" > "$out/$name/run.args"
  fi
  pairs+=("$out/$name/classes.tif" "$truth")
done
[ ${#pairs[@]} -gt 0 ] || { echo "no image with a label in $images" >&2; exit 2; }
"$agriseg" evaluate ${TRUTH_CLASSES:+--truth-classes "$TRUTH_CLASSES"} \
  ${TRUTH_COLORS:+--truth-colors "$TRUTH_COLORS"} ${PRED_CLASSES:+--pred-classes "$PRED_CLASSES"} \
  "${pairs[@]}" | tee "$out/scores.txt"
