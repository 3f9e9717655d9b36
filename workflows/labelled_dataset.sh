#!/usr/bin/env bash
# Segment a folder of labelled images and score them together (one pooled confusion matrix).
#
#   workflows/labelled_dataset.sh IMAGES_DIR LABELS_DIR OUT_DIR [agriseg run options...]
#
# Each image IMAGES_DIR/NAME.* is paired with LABELS_DIR/NAME${LABEL_SUFFIX}.* (first match;
# NAME is matched literally, brackets and stars included); images without a label are skipped
# with a message. Images without a CRS (PNG/JPEG tiles) need `--gsd METRES` among the options.
# Labels coded otherwise than 0=soil 1=crop 2=weed 3=disease 255=unlabelled: set
# TRUTH_CLASSES, e.g. TRUTH_CLASSES=0=soil,1=crop,2=weed. Only the class mask is written per
# image (no indices, zones, fields, report). A rerun skips the images already done, so an
# interrupted evaluation continues. Scores: OUT_DIR/scores.txt.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
images=$1 labels=$2 out=$3
shift 3
agriseg=${AGRISEG:-agriseg}
# Globs that match nothing expand to nothing, not to themselves.
shopt -s nullglob
pairs=()
for img in "$images"/*; do
  [ -f "$img" ] || continue
  name=${img##*/}  # not $(basename ...), which drops a name's trailing newlines
  name=${name%.*}
  # Only the `.*` is a pattern: the quoted name and folder match literally, so the label of
  # images/tile[1].tif is labels/tile[1].tif, never labels/tile1.tif. Expanded by the shell, not
  # read back as lines of text, so spaces and newlines in names stay intact.
  truth=
  for candidate in "$labels/$name${LABEL_SUFFIX:-}".*; do
    if [ -f "$candidate" ]; then truth=$candidate; break; fi
  done
  if [ -z "$truth" ]; then
    echo "no label for $img in $labels, skipped" >&2
    continue
  fi
  if [ ! -f "$out/$name/run.json" ]; then
    "$agriseg" run "$img" --out "$out/$name" --no-indices --no-progress \
      --skip quicklook,zones,fields,report,project "$@"
  fi
  pairs+=("$out/$name/classes.tif" "$truth")
done
[ ${#pairs[@]} -gt 0 ] || { echo "no image with a label in $images" >&2; exit 2; }
"$agriseg" evaluate ${TRUTH_CLASSES:+--truth-classes "$TRUTH_CLASSES"} "${pairs[@]}" \
  | tee "$out/scores.txt"
