"""Self time (tottime) of a cProfile dump by package, and the cumulative time of chosen entry points."""
import collections
import pstats
import sys

st = pstats.Stats(sys.argv[1])
CATS = [  # first match wins
    ("sympy", "/sympy/"),
    ("torch.fx.experimental.symbolic_shapes / sym_node / _sympy (ShapeEnv)", ("symbolic_shapes.py", "sym_node.py",
                                                                           "/torch/utils/_sympy/", "recording.py")),
    ("torch._subclasses (FakeTensor, functional tensor)", "/torch/_subclasses/"),
    ("torch.fx.experimental.proxy_tensor (make_fx)", "proxy_tensor.py"),
    ("torch._dynamo", "/torch/_dynamo/"),
    ("torch._functorch (AOTAutograd, partitioner)", "/torch/_functorch/"),
    ("torch._decomp / _refs / _prims", ("/torch/_decomp/", "/torch/_refs/", "/torch/_prims")),
    ("torch.fx (graph, node, interpreter, passes)", "/torch/fx/"),
    ("torch._inductor", "/torch/_inductor/"),
    ("torch._ops / _library / overrides / utils", ("/torch/_ops.py", "/torch/_library/", "/torch/overrides.py",
                                                   "/torch/utils/")),
    ("train_gpt", "train_gpt.py"),
    ("C builtins (torch ops, isinstance, ...)", "~"),
]
tot = collections.Counter()
total = 0.0
for (fn, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
    total += tt
    for cat, pats in CATS:
        pats = (pats,) if isinstance(pats, str) else pats
        if any(p in fn for p in pats):
            tot[cat] += tt
            break
    else:
        tot["other python"] += tt
print(f"profiled self time total {total:.1f}s")
for cat, t in tot.most_common():
    print(f"  {t:8.1f}s {100 * t / total:5.1f}%  {cat}")

print("\ncumulative time of entry points:")
want = sys.argv[2:] or ["_compile_inner", "compile_inner", "call_user_compiler", "create_aot_dispatcher_function",
                        "run_functionalized_fw_and_collect_metadata", "aot_dispatch_autograd_graph",
                        "aot_dispatch_base_graph", "min_cut_rematerialization_partition", "evaluate_expr",
                        "_evaluate_expr", "_maybe_evaluate_static", "simplify", "produce_guards",
                        "produce_guards_verbose", "insert_deferred_runtime_asserts", "build_guards", "run_node",
                        "get_fake_value", "dispatch", "_cached_dispatch_impl", "_dispatch_impl", "create_proxy",
                        "trace", "aot_export_joint_simple", "create_joint", "inner_fn", "functionalize",
                        "_create_graph", "make_fx", "trace_joint_graph", "_maybe_guard_rel", "guard_bool",
                        "guard_int", "fast_eval"]
rows = collections.defaultdict(lambda: [0, 0.0])
for (fn, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
    if name in want:
        rows[(name, fn.split("site-packages/")[-1], line)][0] += nc
        rows[(name, fn.split("site-packages/")[-1], line)][1] = max(rows[(name, fn.split("site-packages/")[-1], line)][1], ct)
for (name, fn, line), (nc, ct) in sorted(rows.items(), key=lambda r: -r[1][1]):
    if ct > 0.5:
        print(f"  {ct:8.1f}s calls {nc:8d}  {name}  {fn}:{line}")
