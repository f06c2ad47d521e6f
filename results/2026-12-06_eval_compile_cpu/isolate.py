"""One eval graph of train_gpt compiled alone (default model size), as eval_forward builds it, timed.

  --graph plain       hidden(x) under inference_mode (the roundtrip / sliding windows' graph)
          lora_grad   hidden(x, lora) under enable_grad, plus the NLL + autograd.grad of the adapters as
                      score_docs does (the backward is compiled at the first backward)
          lora_nograd hidden(x, lora) under inference_mode
  --dyn   BT          batch marked dynamic, length maybe-dynamic (eval_forward's by-document graphs)
          B           batch dynamic only (eval_forward's plain-window graph)
          none        no dynamic dims, dynamic=False (every shape a static graph)
  --backend aot_eager | inductor (CPU C++ codegen: indicative only, not GPU Triton)
"""
import argparse
import json
import os
from pathlib import Path
import tempfile
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--graph", choices=("plain", "lora_grad", "lora_nograd"), required=True)
ap.add_argument("--dyn", choices=("BT", "B", "none"), required=True)
ap.add_argument("--backend", choices=("aot_eager", "inductor"), default="aot_eager")
ap.add_argument("--B", type=int, default=3)
ap.add_argument("--T", type=int, default=192)
ap.add_argument("--out", required=True)
args = ap.parse_args()
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cache_")  # fresh: no cache hits
sys.path.insert(0, os.environ.get("TRAIN_GPT_DIR", str(Path(__file__).resolve().parents[2])))
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import get_compilation_metrics, compile_times  # noqa: E402
import train_gpt  # noqa: E402
from default_model import default_model  # noqa: E402

torch.set_num_threads(2)
hp, cfg, model = default_model(256)
model.requires_grad_(False)  # score_docs' frozen(model)
lora = train_gpt.LoRA(cfg, hp.ttt_lora_docs, hp.ttt_lora_rank, torch.device("cpu"), train_gpt.lora_targets(hp)) \
    if args.graph != "plain" else None

REC = {}


def _n(gm):
    return len(gm.graph.nodes)


def backend(gm, example_inputs):
    REC["dynamo_nodes"] = _n(gm)
    REC["aot"] = []
    if args.backend == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(gm2, inputs, **kw):
            t = time.perf_counter()
            out = compile_fx_inner(gm2, inputs, **kw)
            REC["aot"].append(dict(kind="bw" if kw.get("is_backward") else "fw/inference", nodes=_n(gm2),
                                   inductor_s=round(time.perf_counter() - t, 2)))
            return out
        return compile_fx(gm, example_inputs, inner_compile=inner)
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def rec(kind):
        def comp(gm2, inputs):
            REC["aot"].append(dict(kind=kind, nodes=_n(gm2)))
            return boxed_nop(gm2, inputs)
        comp._boxed_call = True
        return comp
    return aot_autograd(fw_compiler=rec("fw/inference"), bw_compiler=rec("bw"),
                        partition_fn=min_cut_rematerialization_partition, keep_inference_input_mutations=True)(
        gm, example_inputs)


def hidden(x, lora=None):  # eval_forward's
    return model.hidden(x, looped=True, lora=lora)


compiled = torch.compile(hidden, fullgraph=True, backend=backend, dynamic=False if args.dyn == "none" else None)
x = torch.randint(2, cfg.vocab_size, (args.B, args.T))
if args.dyn in ("B", "BT"):
    torch._dynamo.mark_dynamic(x, 0)
if args.dyn == "BT":
    torch._dynamo.maybe_mark_dynamic(x, 1)
y = torch.randint(2, cfg.vocab_size, (args.B, args.T))

t0 = time.perf_counter()
if args.graph == "lora_grad":
    with torch.enable_grad():
        h = compiled(x, lora)
        t_fw = time.perf_counter() - t0
        nll = model.nll_from_hidden(h, y, lora=lora)
        params = list(lora.parameters())
        t1 = time.perf_counter()
        torch.autograd.grad(nll.mean(), params)
        t_bw = time.perf_counter() - t1
else:
    with torch.inference_mode():
        h = compiled(x, lora)
    t_fw, t_bw = time.perf_counter() - t0, 0.0
# a second call: the compiled graph's own run time (to tell compile from compute)
t2 = time.perf_counter()
if args.graph == "lora_grad":
    with torch.enable_grad():
        h = compiled(x, lora)
        torch.autograd.grad(model.nll_from_hidden(h, y, lora=lora).mean(), params)
else:
    with torch.inference_mode():
        compiled(x, lora)
t_again = time.perf_counter() - t2
ms = get_compilation_metrics()
m = next(x for x in ms if x.entire_frame_compile_time_s is not None)  # the frame's (a lazy backward adds its own)
bw_metrics = [{k: v for k, v in vars(x).items() if k.endswith("_us") and v} for x in ms if x is not m]
out = dict(args=vars(args), first_call_s=round(t_fw, 2), first_backward_s=round(t_bw, 2), second_call_s=round(t_again, 2),
           frame_compile_s=m.entire_frame_compile_time_s, backend_s=m.backend_compile_time_s,
           dynamo_only_s=round(m.entire_frame_compile_time_s - m.backend_compile_time_s, 2),
           guards=m.guard_count, shape_env_guards=m.shape_env_guard_count,
           n_metrics=len(ms), other_metrics=bw_metrics, **REC)
if args.backend == "inductor":
    from torch._dynamo.utils import counters
    out["inductor_counters"] = {k: v for k, v in counters["inductor"].items() if "kernel" in k or "fusion" in k}
print(json.dumps(out))
print(compile_times(repr="str", aggregate=True))
with open(args.out, "w") as f:
    json.dump(out, f)
