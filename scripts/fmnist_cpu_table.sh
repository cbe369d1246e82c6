#!/usr/bin/env bash
# The CPU-sized Fashion-MNIST tables of docs/results.md, each cell evaluated next to ipc random real
# images per class under the same protocol, printed as a Markdown table. Every cell is one
# distill.py run (evaluation included) plus one evaluate.py baseline run; finished cells are
# skipped on a re-run. Budgets are CPU-sized; override them with the variables below.
#
#   bash scripts/fmnist_cpu_table.sh            # core: DC, DSA ipc 1, DM ipc 10 (~35 min, 2 cores)
#   bash scripts/fmnist_cpu_table.sh cafe       # CAFE and CAFE+DSA at ipc 1 and 10
#   bash scripts/fmnist_cpu_table.sh datadam    # DataDAM: paper setting at ipc 1 and 10, released code's at ipc 10
#   bash scripts/fmnist_cpu_table.sh mtt        # buffer.py experts, then MTT, DATM and PAD at ipc 1 and 10
#   bash scripts/fmnist_cpu_table.sh originals  # train_original.py models; DC / DM with CLoM and with feature
#                                               # labels (compare with core); evaluate.py --assess on every set
#   bash scripts/fmnist_cpu_table.sh baselines  # random / herding / k-center at ipc 1 and 10; a cross-architecture
#                                               # table of dsa_ipc1; 5-step continual learning of dm_ipc10;
#                                               # make_table.py over everything; cost of the networks
#   bash scripts/fmnist_cpu_table.sh ncfm       # a pool of train_original.py ConvNets, then NCFM beside DM at ipc 1
#                                               # and 10, all (and random real) under NCFM's student protocol
#   bash scripts/fmnist_cpu_table.sh kip        # KIP (fc_ntk kernel) at ipc 1 and 10, evaluated with the square loss
#   bash scripts/fmnist_cpu_table.sh dd         # DD at ipc 1 (full unroll) and ipc 10 (RaT-BPTT window 10)
#   bash scripts/fmnist_cpu_table.sh frepo      # FRePo (ZCA, ConvNetNN) at ipc 1 and 10
#                                   # (kip, dd, frepo: each set then evaluate.py beside random real images,
#                                   # written to <cell>/eval.json and tabled by scripts/defaults_table.py)
#   bash scripts/fmnist_cpu_table.sh core cafe datadam
#   DRY_RUN=1 bash scripts/fmnist_cpu_table.sh mtt   # print the commands of the cells not run yet, run nothing
#   TINY=1 DATA_PATH=DIR OUT=DIR bash scripts/fmnist_cpu_table.sh core baselines
#                                   # every stage on tiny settings (1 iteration, 1 network, 1 epoch) on
#                                   # the Fashion-MNIST files in DATA_PATH: checks that a group runs
#   OUT=DIR bash scripts/fmnist_cpu_table.sh --dry   # TINY=1, every group, on a generated miniature
#                                   # written to OUT/data (DATA_PATH given: those files instead)
# The defaults are the settings docs/results.md publishes for each table (tests/test_claims.py).
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_GROUPS=(core cafe datadam mtt originals ncfm baselines kip dd frepo)  # baselines after core and originals
GROUPS_ASKED=()
for arg in "$@"; do
  case $arg in
    --dry) TINY=1 ;;
    -*) echo "unknown option $arg (--dry, or group names: ${ALL_GROUPS[*]})" >&2; exit 2 ;;
    *) GROUPS_ASKED+=("$arg") ;;
  esac
done
if [ ${#GROUPS_ASKED[@]} -eq 0 ]; then
  # --dry alone: every group; nothing named: the core table
  if [ -n "${TINY:-}" ] && [[ " $* " == *" --dry "* ]]; then GROUPS_ASKED=("${ALL_GROUPS[@]}"); else GROUPS_ASKED=(core); fi
fi

OUT=${OUT:-result/fmnist_cpu}
NUM_EVAL=${NUM_EVAL:-3}
DC_ITERS=${DC_ITERS:-50}
DM_ITERS=${DM_ITERS:-100}
CAFE_ITERS=${CAFE_ITERS:-10}
DAM_ITERS=${DAM_ITERS:-100}
# CAFE's watchers at CPU size: 5 readings of 32 real images per class, at most 10 image updates
# per iteration (reference: 10 readings of 128, unbounded), reading the plain accuracy (--watcher
# clean, with which docs/results.md was measured; the default is the reference's accumulator).
CAFE_CPU="--watcher_window 5 --watcher_images 32 --max_outer_steps 10 --batch_real 64 --init real --watcher clean"
# Trajectory matching at CPU size: 2 experts of 5 epochs (each epoch ~170 s on 2 cores), 20
# student steps (on 20 of the 100 images at ipc 10), starts in epochs 0-2, 2 expert epochs.
EXPERTS=${EXPERTS:-2}
EXPERT_EPOCHS=${EXPERT_EPOCHS:-5}
MTT_ITERS=${MTT_ITERS:-60}        # docs/results.md: 60 iterations at --lr_img 1000
MTT_LR_IMG=${MTT_LR_IMG:-1000}
MTT_CPU="--expert_epochs 2 --max_start_epoch 3 --lr_lr 1e-5 --lr_teacher 0.01"
DATM_CPU="--min_start_epoch 0 --current_max_start_epoch 2 --expansion_end_epoch 50"
# Original models for CLoM and --assess: 2 ConvNets, 2 epochs each (~130 s an epoch on 2 cores).
ORIGINAL_EPOCHS=${ORIGINAL_EPOCHS:-2}
CLOM_ALPHA=${CLOM_ALPHA:-100}
SEED=${SEED:-0}
DSA=color_crop_cutout_flip_scale_rotate
# DataDAM: 2 networks per set; the random rows with the reference's training batch of 64.
DAM_NUM_EVAL=${DAM_NUM_EVAL:-2}
# NCFM at CPU size (docs/results.md's NCFM table): a pool of 3 ConvNets of 1 epoch (reference: 20 of
# 60), 50 iterations (reference 20000) with 256 real images per class (reference 1024), 300
# evaluation epochs (reference 2000) and 2 networks per row under its student protocol (AdamW, x0.5
# at each fifth, CutMix with p 0.5, DSA without cutout). DM and the random-real rows are trained
# under the same protocol; NCFM's random rows store grids of 4 random real images per image
# (--decode_factor 2), the same storage.
NCFM_POOL=${NCFM_POOL:-3}
NCFM_POOL_EPOCHS=${NCFM_POOL_EPOCHS:-1}
NCFM_ITERS=${NCFM_ITERS:-50}
NCFM_EPOCHS=${NCFM_EPOCHS:-300}
NCFM_NUM_EVAL=${NCFM_NUM_EVAL:-2}
NCFM_DSA=color_crop_flip_scale_rotate
NCFM_EVAL="--optimizer adamw --adamw_schedule multistep --mix_type cutmix --mix_p 0.5 --batch_train 128"
# KIP, DD and FRePo (docs/results.md's KIP, DD and FRePo sections): their sets' budgets and evaluations.
KIP_ITERS=${KIP_ITERS:-300}           # Adam steps, 2000 class-balanced targets each (the colab: 1000+ of 5000)
KIP_TARGETS=${KIP_TARGETS:-2000}
KIP_NUM_EVAL=${KIP_NUM_EVAL:-2}
DD_ITERS_1=${DD_ITERS_1:-100}         # ipc 1 from noise, full unroll
DD_ITERS_10=${DD_ITERS_10:-10}        # ipc 10 from real images, RaT-BPTT window 10
FREPO_ITERS_1=${FREPO_ITERS_1:-200}   # reference: 500000
FREPO_ITERS_10=${FREPO_ITERS_10:-100}
# Extra evaluate.py flags of the random-real baseline and a tag naming its protocol (set per cell).
BASE_EXTRA=""
BASE_TAG=""
# Epochs of the cross-architecture and continual-learning evaluations.
CROSS_EPOCHS=${CROSS_EPOCHS:-300}
CL_EPOCHS=${CL_EPOCHS:-100}
# Where the data is read (DATA_PATH: the stages' --data_path; left out, their own search) and where
# train_original.py's models and buffer.py's experts go (the stages' defaults unless TINY is set).
DATA=(); [ -z "${DATA_PATH:-}" ] || DATA=(--data_path "$DATA_PATH")
PRETRAINED=pretrained_model
ORIG_SAVE=(); ORIG_READ=(); BUFFERS=()
if [ -n "${TINY:-}" ]; then  # a check that every stage of a group runs, not a measurement
  NUM_EVAL=1 DAM_NUM_EVAL=1 NCFM_NUM_EVAL=1 DC_ITERS=1 DM_ITERS=1 CAFE_ITERS=1 DAM_ITERS=1 MTT_ITERS=1
  NCFM_ITERS=1 NCFM_POOL=1 NCFM_POOL_EPOCHS=1 NCFM_EPOCHS=1 EXPERTS=1 ORIGINAL_EPOCHS=1 CROSS_EPOCHS=1 CL_EPOCHS=1
  KIP_ITERS=1 KIP_TARGETS=100 KIP_NUM_EVAL=1 DD_ITERS_1=1 DD_ITERS_10=1 FREPO_ITERS_1=1 FREPO_ITERS_10=1
  if [ -z "${DATA_PATH:-}" ] && [[ " $* " == *" --dry "* ]]; then  # --dry: a generated miniature, 40 images a class
    DATA_PATH="$OUT/data"
    [ -d "$DATA_PATH/FashionMNIST/raw" ] || { mkdir -p "$OUT" && python3 -c 'import sys; from scripts.gpu_check_data import write_miniature; write_miniature(sys.argv[1], 40, 50)' "$DATA_PATH"; }
    DATA=(--data_path "$DATA_PATH")
  fi
  PRETRAINED="$OUT/pretrained_model"
  ORIG_SAVE=(--save_path "$PRETRAINED"); ORIG_READ=(--pretrained_path "$PRETRAINED")
  BUFFERS=(--buffer_path "$OUT/buffers")
  CAFE_CPU="${CAFE_CPU/--max_outer_steps 10/--max_outer_steps 2} --max_inner_steps 2"  # at most 2 x 2 steps, not 10 x 100
  MTT_CPU=${MTT_CPU/--lr_lr 1e-5/--lr_lr 1e-7}  # at 1e-5 one step on the miniature makes the step size negative
  DATM_CPU="$DATM_CPU --init real"  # a 5-epoch expert on a miniature classifies too few images correctly
fi
mkdir -p "$OUT"

run() {  # a command, or (DRY_RUN=1) the command printed
  if [ -n "${DRY_RUN:-}" ]; then printf '+'; printf ' %q' "$@"; echo; else "$@"; fi
}

cell() {  # name method ipc epochs strategy iterations extra-flags... (iterations "-": a coreset, no --Iteration)
  local name=$1 method=$2 ipc=$3 epochs=$4 strategy=$5 iters=$6; shift 6
  local run="$OUT/$name" iteration=()
  [ "$iters" = - ] || iteration=(--Iteration "$iters")
  [ -z "${TINY:-}" ] || epochs=1
  if [ ! -f "$run/results.json" ]; then
    run python3 distill.py --method "$method" --dataset FashionMNIST --ipc "$ipc" "${iteration[@]}" \
      --num_exp 1 --num_eval "$NUM_EVAL" --epoch_eval_train "$epochs" --eval_it 0 --seed "$SEED" \
      --run_dir "$run" --resume "${DATA[@]}" "$@"
  fi
  if [ ! -f "$run/random.json" ]; then
    # One baseline per protocol (ipc, epochs, augmentation), shared by the cells that use it.
    local shared="$OUT/random/ipc${ipc}_e${epochs}_${strategy}_n${NUM_EVAL}_s${SEED}${BASE_TAG:+_$BASE_TAG}.json"
    if [ ! -f "$shared" ]; then
      mkdir -p "$OUT/random"
      run python3 evaluate.py --dataset FashionMNIST --baseline random --ipc "$ipc" --num_eval "$NUM_EVAL" \
        --epoch_eval_train "$epochs" --dsa_strategy "$strategy" --seed "$SEED" --out "$shared" "${DATA[@]}" $BASE_EXTRA
    fi
    run cp "$shared" "$run/random.json"
  fi
}

tiny() {  # n: n, or 1 under TINY (epochs and networks of the kip, dd and frepo evaluations)
  if [ -n "${TINY:-}" ]; then echo 1; else echo "$1"; fi
}

solo() {  # name flags...: one distill.py set, no evaluation inside (then evaluated name ...)
  local name=$1; shift
  [ -f "$OUT/$name/results.json" ] || run python3 distill.py --dataset FashionMNIST --num_eval 0 \
    --run_dir "$OUT/$name" "${DATA[@]}" "$@"
}

evaluated() {  # name flags...: evaluate.py on solo's set beside random real images (its default), to name/eval.json
  local name=$1; shift
  [ -f "$OUT/$name/eval.json" ] || run python3 evaluate.py --dataset FashionMNIST --syn_path "$OUT/$name" \
    --out "$OUT/$name/eval.json" "${DATA[@]}" "$@"
  EVALS+=("$name")
}

assess_all() {  # OM accuracy and distances of every saved set of the sweep, then their correlation with accuracy
  [ -d "$PRETRAINED/FashionMNIST/original/ConvNet" ] || { echo "no original models: run the originals group" >&2; return 0; }
  local assessed=0
  for res in "$OUT"/*/res_*_ConvNet_*.pt; do  # the ConvNet sets (the original models are ConvNets)
    if [ -n "${TINY:-}" ] && [ "$assessed" -ge 3 ]; then break; fi  # TINY: 3 sets a call show the stage runs
    if [ -f "$res" ] && [ ! -f "${res%.pt}_assess.json" ]; then
      assessed=$(( assessed + 1 ))
      run python3 evaluate.py --dataset FashionMNIST --assess --model_num 2 --syn_path "$res" "${DATA[@]}" "${ORIG_READ[@]}" >/dev/null \
        || echo "assessment of $res failed (continuing)" >&2
    fi
  done
  run python3 scripts/assess_correlation.py "$OUT" || echo "assess_correlation.py failed (continuing)" >&2
}

CELLS=() EVALS=()
for group in "${GROUPS_ASKED[@]}"; do
  case $group in
    core)
      cell dc_ipc1  DC  1  300  none  "$DC_ITERS" --init real
      cell dsa_ipc1 DSA 1  1000 "$DSA" "$DC_ITERS" --init real
      cell dm_ipc10 DM  10 300  "$DSA" "$DM_ITERS"
      CELLS+=(dc_ipc1 dsa_ipc1 dm_ipc10) ;;
    cafe)  # reference evaluation: 600 epochs without augmentation, 1000 with DSA
      cell cafe_ipc1      CAFE 1  600  none   "$CAFE_ITERS" $CAFE_CPU
      cell cafe_dsa_ipc1  CAFE 1  1000 "$DSA" "$CAFE_ITERS" $CAFE_CPU --dsa_strategy "$DSA"
      cell cafe_ipc10     CAFE 10 600  none   "$CAFE_ITERS" $CAFE_CPU
      cell cafe_dsa_ipc10 CAFE 10 1000 "$DSA" "$CAFE_ITERS" $CAFE_CPU --dsa_strategy "$DSA"
      CELLS+=(cafe_ipc1 cafe_dsa_ipc1 cafe_ipc10 cafe_dsa_ipc10) ;;
    datadam)  # 300 DSA epochs instead of the reference's 1800; paper (ConvNet, attention power 4) and
              # released code (ConvNetBN, attention power 1)
      NUM_EVAL=$DAM_NUM_EVAL BASE_TAG=b64 BASE_EXTRA="--batch_train 64" \
        cell datadam_ipc1  DataDAM 1  300 "$DSA" "$DAM_ITERS"
      NUM_EVAL=$DAM_NUM_EVAL BASE_TAG=b64 BASE_EXTRA="--batch_train 64" \
        cell datadam_ipc10 DataDAM 10 300 "$DSA" "$DAM_ITERS"
      NUM_EVAL=$DAM_NUM_EVAL BASE_TAG=bn_b64 BASE_EXTRA="--batch_train 64 --model ConvNetBN" \
        cell datadam_bn_ipc10 DataDAM 10 300 "$DSA" "$DAM_ITERS" --model ConvNetBN --attention_power 1
      CELLS+=(datadam_ipc1 datadam_ipc10 datadam_bn_ipc10) ;;
    mtt)  # experts: 2 x 5 epochs; evaluation 300 DSA epochs (reference: 1000) with the learned lr
      run python3 buffer.py --dataset FashionMNIST --model ConvNet --num_experts "$EXPERTS" \
        --train_epochs "$EXPERT_EPOCHS" --save_interval 1 --test_every "$EXPERT_EPOCHS" "${DATA[@]}" "${BUFFERS[@]}"
      cell mtt_ipc1   MTT  1  300 "$DSA" "$MTT_ITERS" $MTT_CPU "${BUFFERS[@]}" --syn_steps 20 --lr_img "$MTT_LR_IMG"
      cell datm_ipc1  DATM 1  300 "$DSA" "$MTT_ITERS" $MTT_CPU "${BUFFERS[@]}" $DATM_CPU --syn_steps 20 --lr_img "$MTT_LR_IMG"
      cell pad_ipc1   PAD  1  300 "$DSA" "$MTT_ITERS" $MTT_CPU "${BUFFERS[@]}" $DATM_CPU --syn_steps 20 --lr_img "$MTT_LR_IMG" \
        --batch_syn 0 --loss_ratio 0.25 --depth_ratio 0.25
      cell mtt_ipc10  MTT  10 300 "$DSA" "$MTT_ITERS" $MTT_CPU "${BUFFERS[@]}" --syn_steps 20 --batch_syn 20 --lr_img "$MTT_LR_IMG"
      cell datm_ipc10 DATM 10 300 "$DSA" "$MTT_ITERS" $MTT_CPU "${BUFFERS[@]}" $DATM_CPU --syn_steps 20 --batch_syn 20 --lr_img "$MTT_LR_IMG"
      cell pad_ipc10  PAD  10 300 "$DSA" "$MTT_ITERS" $MTT_CPU "${BUFFERS[@]}" $DATM_CPU --syn_steps 20 --batch_syn 20 \
        --lr_img "$MTT_LR_IMG" --loss_ratio 0.25 --depth_ratio 0.25
      CELLS+=(mtt_ipc1 datm_ipc1 pad_ipc1 mtt_ipc10 datm_ipc10 pad_ipc10) ;;
    originals)  # the same budgets and protocols as core's dc_ipc1 and dm_ipc10
      run python3 train_original.py --dataset FashionMNIST --model ConvNet --num 2 --epochs "$ORIGINAL_EPOCHS" \
        --lr_decay_step 1 "${DATA[@]}" "${ORIG_SAVE[@]}"
      assess_all  # the sets of the other groups first (cheap), then the new cells
      CLOM="--alphas $CLOM_ALPHA --models_pool ConvNet --model_num 2"
      cell dc_clom_ipc1  DC 1  300 none   "$DC_ITERS" --init real $CLOM "${ORIG_READ[@]}"
      cell dm_clom_ipc10 DM 10 300 "$DSA" "$DM_ITERS" $CLOM "${ORIG_READ[@]}"
      cell dc_feat_ipc1  DC 1  300 none   "$DC_ITERS" --init real --feature_labels
      cell dm_feat_ipc10 DM 10 300 "$DSA" "$DM_ITERS" --feature_labels
      CELLS+=(dc_clom_ipc1 dm_clom_ipc10 dc_feat_ipc1 dm_feat_ipc10)
      assess_all ;;
    ncfm)  # the pool under its own --save_path; NCFM and DM cells under NCFM's student protocol
      run python3 train_original.py --dataset FashionMNIST --model ConvNet --num "$NCFM_POOL" \
        --epochs "$NCFM_POOL_EPOCHS" --lr_decay_step "$NCFM_POOL_EPOCHS" --save_path "$OUT/ncfm_pool" "${DATA[@]}"
      NCFM_CPU="--batch_real 256 --num_premodel $NCFM_POOL --pretrain_dir $OUT/ncfm_pool"
      for ipc in 1 10; do
        NUM_EVAL=$NCFM_NUM_EVAL BASE_TAG=ncfm_f2 BASE_EXTRA="$NCFM_EVAL --decode_factor 2" \
          cell "ncfm_ipc$ipc" NCFM "$ipc" "$NCFM_EPOCHS" "$NCFM_DSA" "$NCFM_ITERS" $NCFM_CPU
        NUM_EVAL=$NCFM_NUM_EVAL BASE_TAG=ncfm_f1 BASE_EXTRA="$NCFM_EVAL" \
          cell "dm_ncfm_ipc$ipc" DM "$ipc" "$NCFM_EPOCHS" "$NCFM_DSA" "$NCFM_ITERS" --dsa_strategy "$NCFM_DSA" $NCFM_EVAL
        CELLS+=("ncfm_ipc$ipc" "dm_ncfm_ipc$ipc")
      done ;;
    baselines)  # coresets under the protocols of dc_ipc1 / dm_ipc10; needs core's dsa_ipc1 and dm_ipc10
      for ipc in 1 10; do
        # ipc 1 as dc_ipc1 (no augmentation), ipc 10 as dm_ipc10 (DSA: the set's --dsa_strategy)
        if [ "$ipc" = 1 ]; then protocol=(300 none); aug=(); else protocol=(300 "$DSA"); aug=(--dsa_strategy "$DSA"); fi
        for m in random herding kcenter; do
          cell "${m}_ipc$ipc" "$m" "$ipc" "${protocol[@]}" - "${aug[@]}"
          CELLS+=("${m}_ipc$ipc")
        done
      done
      # Cross-architecture: CPU-sized 300 DSA epochs (reference: 1000), 3 networks per architecture.
      [ -f "$OUT/crossarch_dsa_ipc1.json" ] || run python3 evaluate.py --dataset FashionMNIST \
        --syn_path "$OUT/dsa_ipc1" --eval_mode M --num_eval "$NUM_EVAL" --epoch_eval_train "$CROSS_EPOCHS" \
        --seed "$SEED" --out "$OUT/crossarch_dsa_ipc1.json" "${DATA[@]}"
      # Continual learning: 5 steps of 2 classes, 5 class orders, 1 network per order and step,
      # 100 DSA epochs (reference: 3 networks, 1000 epochs; 300 epochs took ~75 s a step here).
      [ -f "$OUT/continual/cl5_dm_ipc10.json" ] || run python3 scripts/continual.py --dataset FashionMNIST --steps 5 \
        --syn_path "$OUT/dm_ipc10" --baselines random herding --num_eval 1 --epoch_eval_train "$CL_EPOCHS" \
        --seed "$SEED" --out "$OUT/continual/cl5_dm_ipc10.json" "${DATA[@]}"
      assess_all  # the coreset sets too (needs originals' models)
      run python3 scripts/make_table.py "$OUT" --model ConvNet --out_dir "$OUT/tables" --original_path "$PRETRAINED"
      run python3 scripts/cost.py --dataset FashionMNIST --eval_mode M --out "$OUT/cost_M.json" ;;
    kip)  # fc_ntk kernel, --norm_stats dc (the default when measured); 2 ConvNets per row with the summed
          # square loss the rows were measured with (KIP's default is now the averaged mse)
      for ipc in 1 10; do
        if [ "$ipc" = 1 ]; then epochs=200; else epochs=50; fi
        solo "kip_ipc$ipc" --method KIP --ipc "$ipc" --Iteration "$KIP_ITERS" --target_batch_size "$KIP_TARGETS" \
          --norm_stats dc --threads 1 --checkpoint_every 0
        evaluated "kip_ipc$ipc" --random_baseline --num_eval "$(tiny "$KIP_NUM_EVAL")" \
          --epoch_eval_train "$(tiny "$epochs")" --label_loss mse_sum --threads 1
      done ;;
    dd)  # ConvNet (DD's default is now LeNet, the reference's), real batch 64; evaluation under the protocol saved with the set and under its learned schedule
      solo dd_ipc1 --method DD --model ConvNet --ipc 1 --Iteration "$DD_ITERS_1" --batch_real 64 --threads 1
      if [ -n "${TINY:-}" ]; then evaluated dd_ipc1 --num_eval 1 --epoch_eval_train 1 --threads 1
      else evaluated dd_ipc1 --num_eval 5 --threads 1; fi
      solo dd_ipc10 --method DD --model ConvNet --ipc 10 --Iteration "$DD_ITERS_10" --batch_real 64 --init real --rat_bptt \
        --truncation 10 --threads 1
      evaluated dd_ipc10 --num_eval "$(tiny 2)" --epoch_eval_train "$(tiny 50)" --threads 1 ;;
    frepo)  # ZCA, ConvNetNN, real batch 256, --lr_img 0.003; 3 / 2 ConvNetNN of 300 / 100 epochs
      solo frepo_ipc1 --method FRePo --model ConvNetNN --zca --ipc 1 --Iteration "$FREPO_ITERS_1" --batch_real 256 \
        --lr_img 0.003 --epoch_eval_train "$(tiny 300)" --threads 1
      evaluated frepo_ipc1 --zca --model ConvNetNN --num_eval "$(tiny 3)" --threads 1
      solo frepo_ipc10 --method FRePo --model ConvNetNN --zca --ipc 10 --Iteration "$FREPO_ITERS_10" --batch_real 256 \
        --lr_img 0.003 --epoch_eval_train "$(tiny 100)" --threads 1
      evaluated frepo_ipc10 --zca --model ConvNetNN --num_eval "$(tiny 2)" --epoch_eval_train "$(tiny 100)" --threads 1 ;;
    *) echo "unknown group $group (${ALL_GROUPS[*]})" >&2; exit 2 ;;
  esac
done

[ -z "${DRY_RUN:-}" ] || exit 0
if [ ${#EVALS[@]} -gt 0 ]; then  # kip, dd, frepo: each set beside random real images under its own protocol
  python3 scripts/defaults_table.py "$OUT"
fi
[ ${#CELLS[@]} -gt 0 ] || exit 0
python3 - "$OUT" "$PRETRAINED" "${CELLS[@]}" <<'PY'
import json, os, sys
from sets import comparison
out, pretrained = sys.argv[1:3]
print("| method | ipc | iterations | eval epochs, augmentation | distilled (%) | random real (%) | IOR (points) | s / iteration |")
print("|---|---|---|---|---|---|---|---|")
for name in sys.argv[3:]:
    res = json.load(open(os.path.join(out, name, "results.json")))
    model = next(iter(res["accuracy"]))  # the cell's network (ConvNet, or DataDAM's ConvNetBN)
    rnd = json.load(open(os.path.join(out, name, "random.json")))[model]
    acc = res["accuracy"][model]
    proto = res["protocol"][model]
    print(f"| {res['method']} | {res['ipc']} | {res['iterations']} | {proto['epochs']}, {proto['augmentation']} | "
          f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} | {100 * rnd['mean']:.2f} ± {100 * rnd['std']:.2f} | "
          f"{100 * (acc['mean'] - rnd['mean']):+.2f} | {res['seconds_per_iteration']:.2f} |")
whole = comparison.whole_dataset_accuracy(pretrained, "FashionMNIST", "ConvNet")
if whole is not None:  # train_original.py's models (the originals group), their own protocol
    print(f"\nwhole dataset (train_original.py, {len(whole['accs'])} ConvNets, {whole['protocol'].get('epochs')} epochs): "
          f"{100 * whole['mean']:.2f} ± {100 * whole['std']:.2f}")
PY
