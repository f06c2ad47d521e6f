"""Where does the compile time of train_gpt's eval graphs (prime_eval) go? CPU only.

Runs train_gpt.prime_eval at the DEFAULT model size (11 layers, 17 virtual, dim 512, LoRA rank 80 on
q,k,v,o,mlp,head) with torch.compile patched to one of:
  eager      torch.compile -> identity (same control flow, nothing compiled): the compute to subtract
  aot_eager  Dynamo + AOTAutograd (joint graph, partitioner), no Inductor; a wrapping backend records
             node counts and times per graph
  inductor   Dynamo + AOTAutograd + Inductor (CPU C++ codegen), only for graph(s) chosen by --inductor-graphs
             (the others go through aot_eager)
Only the priming stream's length is reduced (--seq: TRAIN_SEQ_LEN = EVAL_SEQ_LEN), which does not change
the graphs' structure (layers, loops, LoRA targets and rank are default).
"""
import argparse
import cProfile
import collections
import json
import logging
import os
from pathlib import Path
import tempfile
import pstats
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--mode", choices=("eager", "aot_eager", "inductor"), required=True)
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--inductor-graphs", default="", help="comma list of graph ordinals (0-based, in Dynamo order) "
                "compiled with inductor in --mode inductor; the rest aot_eager")
ap.add_argument("--profile", default="", help="cProfile the whole priming into this file")
ap.add_argument("--out", required=True, help="json results")
ap.add_argument("--variant", default="", help="dynT: eval_forward marks the length maybe-dynamic for plain "
                "windows too (a suggested change, patched here; train_gpt.py untouched)")
ap.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU (as CUDA's graph: casts in it)")
args = ap.parse_args()

cache = tempfile.mkdtemp(prefix="inductor_cache_")  # a fresh inductor/AOT cache dir: a fresh machine
os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache

sys.path.insert(0, os.environ.get("TRAIN_GPT_DIR", str(Path(__file__).resolve().parents[2])))  # the repository root
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.backends.debugging import aot_eager, boxed_nop  # noqa: E402
from torch._functorch.partitioners import min_cut_rematerialization_partition  # noqa: E402
import train_gpt  # noqa: E402
from default_model import default_model  # noqa: E402

torch.set_num_threads(args.threads)
torch._logging.set_logs(recompiles=True, graph_breaks=True)

# ---------------------------------------------------------------- recording backend
GRAPHS = []  # one dict per Dynamo graph handed to the backend
_current = None


def _nodes(gm):
    ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    return len(gm.graph.nodes), ops


def _placeholder_shapes(gm):
    """The fake (symbolic) shapes Dynamo traced with: the x input, and the SymInt inputs."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("example_value")
        if isinstance(v, torch.SymInt):
            out.append(f"{n.name}=SymInt({v})")
        elif isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape):
            out.append(f"{n.name}{tuple(str(d) for d in v.shape)}")
    return out


def recording_backend(gm, example_inputs):
    global _current
    k = len(GRAPHS)
    rec = dict(ordinal=k, dynamo_nodes=_nodes(gm)[0], dynamo_call_function=_nodes(gm)[1],
               inputs=len(example_inputs), grad_enabled=torch.is_grad_enabled(),
               inference_mode=torch.is_inference_mode_enabled(),
               input_shapes=[str(tuple(t.shape)) for t in example_inputs if isinstance(t, torch.Tensor)][:3],
               placeholder_shapes=_placeholder_shapes(gm),
               compilers=[], partition_s=0.0)
    GRAPHS.append(rec)
    _current = rec
    use_inductor = args.mode == "inductor" and str(k) in args.inductor_graphs.split(",")
    rec["backend"] = "inductor" if use_inductor else "aot_eager"
    t0 = time.perf_counter()
    if use_inductor:
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(gm2, inputs, **kw):  # record the AOT graphs Inductor gets, time Inductor's part
            t = time.perf_counter()
            out = compile_fx_inner(gm2, inputs, **kw)
            rec["compilers"].append(dict(kind="bw" if kw.get("is_backward") else
                                         ("inference" if kw.get("is_inference") else "fw"),
                                         nodes=_nodes(gm2)[0], call_function=_nodes(gm2)[1],
                                         inductor_s=time.perf_counter() - t))
            return out
        fn = compile_fx(gm, example_inputs, inner_compile=inner)
    else:
        def make(kind):
            def comp(gm2, inputs):
                rec["compilers"].append(dict(kind=kind, nodes=_nodes(gm2)[0], call_function=_nodes(gm2)[1]))
                return boxed_nop(gm2, inputs)
            comp._boxed_call = True
            return comp

        def partition(joint, joint_inputs, **kw):
            t = time.perf_counter()
            rec["joint_nodes"] = _nodes(joint)[0]
            out = min_cut_rematerialization_partition(joint, joint_inputs, **kw)
            rec["partition_s"] += time.perf_counter() - t
            return out
        from torch._dynamo.backends.common import aot_autograd
        fn = aot_autograd(fw_compiler=make("fw_or_inference"), bw_compiler=make("bw"), partition_fn=partition,
                          keep_inference_input_mutations=True)(gm, example_inputs)
    rec["backend_s"] = time.perf_counter() - t0
    return fn


real_compile = torch.compile


def patched_compile(fn=None, **kw):
    if args.mode == "eager":
        return fn
    kw["backend"] = recording_backend
    return real_compile(fn, **kw)


torch.compile = patched_compile

if args.bf16:  # the CUDA path's autocast, on CPU: bf16 matmuls and a bf16 residual stream (RESIDUAL_DTYPE)
    import contextlib
    train_gpt.autocast_ctx = lambda device: torch.autocast("cpu", dtype=torch.bfloat16)

# ---------------------------------------------------------------- model, knobs, priming
hp, cfg, model = default_model(args.seq)
n_params = sum(p.numel() for p in model.parameters())
print(f"train_gpt {train_gpt.__file__} torch {torch.__version__} threads {torch.get_num_threads()} mode {args.mode} seq {args.seq} "
      f"layers {cfg.num_layers} virtual {len(cfg.layer_order(True))} dim {cfg.model_dim} "
      f"lora rank {hp.ttt_lora_rank} targets {hp.ttt_lora_targets} docs {hp.ttt_lora_docs} params {n_params}",
      flush=True)

if args.variant in ("dynT", "dynT_frozen", "dynT_frozen_contig"):
    def eval_forward_dynT(model, hp, device, by_document):
        def hidden(x, lora=None):
            return model.hidden(x, looped=True, lora=lora)
        if not train_gpt.eval_compiles(hp, device):
            return hidden
        train_gpt.configure_inductor()
        compiled = torch.compile(hidden, fullgraph=True)

        def dynamic_hidden(x, lora=None):
            torch._dynamo.mark_dynamic(x, 0)
            if args.variant == "dynT_frozen_contig":
                with torch.inference_mode(False):  # a normal tensor, as chunk_nll's x (a dispatch-key guard)
                    x = x.contiguous()  # score_windows passes win[:, :-1], a strided view: a stride guard
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.maybe_mark_dynamic(x, 1)  # every path: plain windows share the no-LoRA graph
            return compiled(x, lora)
        return dynamic_hidden
    train_gpt.eval_forward = eval_forward_dynT
if args.variant in ("dynT_frozen", "dynT_frozen_contig"):  # dynT, and plain windows scored with the weights frozen as by-document passes are
    real_score_windows = train_gpt.score_windows

    def score_windows_frozen(model, *a, **kw):
        with train_gpt.frozen(model):
            return real_score_windows(model, *a, **kw)
    train_gpt.score_windows = score_windows_frozen

# time each eval_forward call (compile happens inside the first call of each graph)
CALLS = []
real_eval_forward = train_gpt.eval_forward


def timed_eval_forward(model, hp, device, by_document):
    f = real_eval_forward(model, hp, device, by_document)

    def g(x, lora=None):
        n0 = len(GRAPHS)
        t = time.perf_counter()
        if prof:
            prof.enable()
        out = f(x, lora)
        if prof:
            prof.disable()
        CALLS.append(dict(by_document=by_document, lora=lora is not None, grad=torch.is_grad_enabled(),
                          shape=tuple(x.shape), s=time.perf_counter() - t, new_graphs=len(GRAPHS) - n0))
        return out
    return g


train_gpt.eval_forward = timed_eval_forward
prof = cProfile.Profile() if args.profile else None

# backward passes (AOT's backward is compiled lazily, at the first backward)
BW = []
real_grad = torch.autograd.grad


def timed_grad(*a, **kw):
    t = time.perf_counter()
    out = real_grad(*a, **kw)
    BW.append(time.perf_counter() - t)
    return out


torch.autograd.grad = timed_grad

lines = []
t0 = time.perf_counter()
secs = train_gpt.prime_eval(model, hp.train_seq_len, train_gpt.Dist(), hp, lines.append)
if prof:
    prof.dump_stats(args.profile)
wall = time.perf_counter() - t0
print("\n".join(lines))
print(f"prime_eval wall {wall:.1f}s (its own clock {secs:.1f}s)")

from torch._dynamo.utils import compile_times, counters, get_compilation_metrics  # noqa: E402

metrics = []
for m in get_compilation_metrics():
    metrics.append({k: getattr(m, k, None) for k in (
        "compile_id", "co_name", "guard_count", "shape_env_guard_count", "graph_op_count", "graph_node_count",
        "graph_input_count", "entire_frame_compile_time_s", "backend_compile_time_s", "inductor_compile_time_s",
        "code_gen_time_s", "dynamo_cumulative_compile_time_us", "aot_autograd_cumulative_compile_time_us",
        "inductor_cumulative_compile_time_us", "inductor_code_gen_cumulative_compile_time_us",
        "backward_cumulative_compile_time_us", "fail_type", "fail_reason", "restart_reasons",
        "dynamo_time_before_restart_s", "has_guarded_code", "cache_size", "is_forward")})
    metrics[-1]["restart_reasons"] = sorted(metrics[-1]["restart_reasons"] or [])
ct = compile_times(repr="str", aggregate=True)
print(ct)
res = dict(args=vars(args), torch=torch.__version__, wall_s=wall, prime_s=secs, log=lines, graphs=GRAPHS,
           metrics=metrics, compile_times=ct, calls=CALLS, backward_calls_s=BW,
           counters={k: dict(v) for k, v in counters.items()})
with open(args.out, "w") as f:
    json.dump(res, f, indent=1, default=str)
for g in GRAPHS:
    print(json.dumps(g, default=str))
for m in metrics:
    print(json.dumps(m, default=str))
agg = collections.defaultdict(lambda: [0, 0.0])
for c in CALLS:
    key = (c["by_document"], c["lora"], c["grad"])
    agg[key][0] += 1
    agg[key][1] += c["s"]
for k, (n, s) in agg.items():
    print(f"calls by_document={k[0]} lora={k[1]} grad={k[2]}: n={n} total={s:.2f}s")
print(f"backward calls: n={len(BW)} total={sum(BW):.2f}s first={BW[0] if BW else 0:.2f}s")
if prof:
    pstats.Stats(args.profile).sort_stats("cumulative").print_stats(40)
