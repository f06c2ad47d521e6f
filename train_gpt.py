"""Parameter golf: train the best language model whose artifact fits in 16,000,000 bytes.

One file, read top to bottom: knobs, distributed context and logging, data, bits per byte, model (math
only), optimizer, quantization + packing, compilation, evaluation, training (then the export), main, and
last the fast paths (custom kernels).
Every knob is an environment variable (`python train_gpt.py --help` lists them); the defaults
are the best configuration measured on the benchmark.

  8 GPUs:   torchrun --standalone --nproc_per_node=8 train_gpt.py
  1 GPU:    torchrun --standalone --nproc_per_node=1 train_gpt.py   (same global batch, more accumulation)
  CPU:      python train_gpt.py   (float32, no compile; for tests and tiny configs)

The score (final_val_bpb) is the exact tokenizer-agnostic bits per byte of the model reloaded from
the artifact. Artifact bytes = model file + the file that runs (ship scripts/pack_code.py's packed form).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import errno
import glob
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import os
import platform
import re
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import brotli
import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.adamw import adamw

ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal bytes: compressed model + this file
RULE_SECONDS = 600.0  # the limit on training and on evaluation: a budget knob may tighten it for validity, not loosen
DOWNLOAD_HINT = "python3 data/cached_challenge_fineweb.py --variant sp8192 --repo-id kevclark/parameter-golf"


class UserError(Exception):
    """Bad input or configuration: reported as one line on stderr, exit code 2."""
    exit_code = 2


class Interrupted(UserError):
    """SIGTERM/SIGINT: logged, exit 128+signal; artifacts are only ever renamed into place whole."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


# -----------------------------------------------------------------------------------------
# Knobs
# Every environment knob is declared once: the run's in the tables below, the model's as the fields
# of ModelConfig (which the artifact records). Nothing else reads os.environ for configuration.
# A knob's type is its default's: bool (0/1), int, float, str, an enum (`choices`) or auto | 0 | 1.
# -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Knob:
    name: str
    default: object
    doc: str
    lo: float | None = None  # inclusive numeric bounds
    hi: float | None = None
    choices: tuple | None = None


class Auto(str):
    """The type of a tri-state knob's default: `auto`, told apart from an enum's word "auto"."""

    def __bool__(self):  # `if hp.eval_compile:` would read "auto" as on
        raise TypeError("an auto knob has no truth value: compare it with AUTO, True or False")


AUTO = Auto("auto")


def knob(default, doc: str, lo=None, hi=None, choices=None):
    """A ModelConfig field that is also a knob (its env name is the field name in capitals)."""
    return dataclasses.field(default=default, metadata=dict(doc=doc, lo=lo, hi=hi, choices=choices))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model's shape and features: knobs at training time, recorded in the artifact."""
    vocab_size: int = knob(8192, "vocabulary size; must equal the tokenizer's", 2, 65536)
    num_layers: int = knob(11, "physical transformer blocks", 1, 256)
    model_dim: int = knob(512, "residual width", 8)
    num_heads: int = knob(8, "query heads", 1)
    num_kv_heads: int = knob(4, "key/value heads (GQA); must divide NUM_HEADS", 1)
    mlp_mult: int = knob(4, "MLP hidden = MLP_MULT * MODEL_DIM", 1)
    mlp_leaky_slope: float = knob(0.5, "MLP activation leaky_relu(x, slope)^2; 0 = relu^2", 0, 1)
    rope_base: float = knob(10000.0, "RoPE base frequency", 1)
    rope_dims: int = knob(16, "head dims rotated by RoPE (even); 0 = all", 0)
    logit_softcap: float = knob(30.0, "logits = c*tanh(z/c)", 1)
    qk_gain_init: float = knob(5.0, "initial per-head gain on RMS-normed queries", 0)
    tied_embed_init_std: float = knob(0.005, "init std of the tied embedding", 0)
    ln_scale: bool = knob(True, "scale block i's normed inputs by 1/sqrt(i+1)")
    skip_gates: bool = knob(True, "sigmoid-gated U-Net skips (0 = plain weighted add)")
    xsa_last_n: int = knob(11, "exclusive self-attention on the last N physical layers", 0)
    num_loops: int = knob(2, "extra passes over layers LOOP_START..LOOP_END (depth recurrence); 0 = off", 0, 64)
    loop_start: int = knob(3, "first looped physical layer", 0)
    loop_end: int = knob(5, "last looped physical layer (inclusive)", 0)
    parallel_residual_start: int = knob(7, "layers >= this run attention and MLP in parallel; -1 = never", -1)
    x0_mix: bool = knob(False, "learned per-channel mix of the normed embedding x0 into each block's input, x <- a*x + "
                         "b*x0 from a=1, b=0 (the records'); off, a block reads the residual stream alone")
    smear_gate: bool = knob(True, "SmearGate: add a gated copy of the previous token's embedding (never across a BOS)")
    attn_gate: bool = knob(True, "SparseGate: gate each head's output by a sigmoid of GATE_WINDOW input channels")
    asym_logit: bool = knob(True, "AsymLogit: separate softcaps for positive and negative logits; only TTT moves them")
    residual_dtype: str = knob("bfloat16", "residual stream dtype under bf16 autocast (CUDA; CPU always float32): "
                               "float32 | bfloat16", choices=("float32", "bfloat16"))

    @property
    def head_dim(self):
        return self.model_dim // self.num_heads

    def layer_order(self, looped: bool) -> list[int]:
        """Physical layer index of each virtual layer; the looped span repeats NUM_LOOPS times."""
        if not (looped and self.num_loops):
            return list(range(self.num_layers))
        span = list(range(self.loop_start, self.loop_end + 1))
        return list(range(self.loop_start)) + span * (self.num_loops + 1) + list(range(self.loop_end + 1, self.num_layers))

    def num_skips(self) -> int:
        return max(min(len(o) // 2, len(o) - len(o) // 2) for o in (self.layer_order(False), self.layer_order(True)))


MODEL_KNOBS = [Knob(f.name.upper(), f.default, f.metadata["doc"], f.metadata["lo"], f.metadata["hi"],
                    f.metadata["choices"]) for f in dataclasses.fields(ModelConfig)]
RUN_KNOBS = [
    Knob("DATA_PATH", "./data/datasets/fineweb10B_sp8192", "folder with fineweb_{train,val}_*.bin shards"),
    Knob("VAL_FILES", "", "glob of validation shards; empty = DATA_PATH/fineweb_val_*.bin"),
    Knob("EVAL_ONLY", "", "path of an artifact: evaluate it on the val shards and train nothing"),
    Knob("TOKENIZER_PATH", "./data/tokenizers/fineweb_8192_bpe.model", "SentencePiece .model used for byte accounting"),
    Knob("RUN_ID", "", "log/artifact name; empty = <UTC time>_seed<SEED>"),
    Knob("SEED", 1337, "seeds init, data order and everything random", 0, 2**31 - 1),
    Knob("LOG_DIR", "logs", "where <RUN_ID>.txt is written"),
    Knob("ARTIFACT_DIR", ".", "where final_model_<RUN_ID>.int<MATRIX_BITS>.br is written (never overwritten)"),
    Knob("PREQUANT_SAVE", "", "file (never overwritten) to also write what the export quantizes: the EMA weights and "
         "GPTQ Hessians, for re-exports under other export knobs (bench/eval_sweep.py PREQUANT=); empty = off"),
    Knob("DEVICE", "auto", "auto | cuda | cpu", choices=("auto", "cuda", "cpu")),
    Knob("COMPILE", True, "torch.compile the model on CUDA (0 for debugging; never on CPU)"),
    Knob("COMPILE_CACHE", "", "file of torch.compile's caches: loaded at start where it exists (another machine "
         "then compiles from it, most of the work skipped), else written at the end of the run, or as a signal (a time "
         "limit) stops it (delete it to renew it); load only files you wrote (they are unpickled); empty = off"),
    Knob("ATTN_BACKEND", "auto", "auto (CUDA: FlashAttention 4, else 3, else cuDNN SDPA, by what is importable; "
         "CPU: SDPA) | fa4 | fa3 | sdpa (torch's choice) | sdpa_cudnn",
         choices=("auto", "fa4", "fa3", "sdpa", "sdpa_cudnn")),
]
SCHEDULE_KNOBS = [
    Knob("ITERATIONS", 20000, "max optimizer steps; the schedule (warmdown, loop, lengths) runs on the larger of "
         "steps/ITERATIONS and the clock's share of its cap", 1),
    Knob("MAX_WALLCLOCK_SECONDS", 600.0, "training clock cap incl. GPTQ's Hessians (not compile or val); 0 = none", 0),
    Knob("WARMUP_STEPS", 20, "compile-priming steps, undone afterwards (not an LR warmup)", 0),
    Knob("TRAIN_BATCH_TOKENS", 786432, "global tokens per optimizer step, for any world size", 1),
    Knob("TRAIN_SEQ_LEN", 2048, "training sequence length (the last one under TRAIN_SEQ_SCHEDULE)", 8),
    Knob("TRAIN_SEQ_SCHEDULE", "", "progressive context: 'L@f,...' trains at length L until training progress f, "
         "then at the next, TRAIN_SEQ_LEN after the last (e.g. 1024@0.1,2048@0.7 with TRAIN_SEQ_LEN=3072); each "
         "switch re-warms the LR over SEQ_REWARM_STEPS steps; empty = TRAIN_SEQ_LEN throughout"),
    Knob("MICRO_BATCH_TOKENS", 0, "max tokens per forward/backward per GPU; 0 = auto (98304 CUDA, 16384 CPU)", 0),
    Knob("VAL_LOSS_EVERY", 1000, "validate every N steps (and at the end); 0 = only at the end", 0),
    Knob("VAL_MAX_TOKENS", 0, "score only the first N val tokens (quick runs: logged valid:0); 0 = all", 0),
    Knob("TRAIN_LOG_EVERY", 200, "log a train line every N steps (and steps 1-5)", 1),
    Knob("ENABLE_LOOPING_AT", 0.35, "training progress fraction at which depth recurrence turns on", 0, 1),
]
OPTIMIZER_KNOBS = [
    Knob("MATRIX_LR", 0.022, "Muon learning rate (block matrices)", 0),
    Knob("SCALAR_LR", 0.02, "Adam learning rate (gains, mixes, skip weights)", 0),
    Knob("TIED_EMBED_LR", 0.03, "Adam learning rate (tied embedding)", 0),
    Knob("MUON_MOMENTUM", 0.99, "Muon Nesterov momentum", 0, 1),
    Knob("MUON_MOMENTUM_WARMUP_START", 0.92, "Muon momentum at step 0", 0, 1),
    Knob("MUON_MOMENTUM_WARMUP_STEPS", 1500, "steps to warm momentum up linearly", 0),
    Knob("MUON_BACKEND_STEPS", 5, "Newton-Schulz iterations", 1),
    Knob("MUON_NS_SCHEDULE", "polar", "Newton-Schulz coefficients: polar (Polar Express; needs MUON_BACKEND_STEPS "
         ">= 5) | quintic (Muon's original)", choices=("polar", "quintic")),
    Knob("MUON_ROW_NORMALIZE", True, "MuonEq-R: normalize update rows before Newton-Schulz"),
    Knob("MUON_WD", 0.095, "decoupled weight decay on Muon matrices", 0),
    Knob("EMBED_WD", 0.085, "AdamW weight decay on the embedding", 0),
    Knob("ADAM_WD", 0.02, "AdamW weight decay on scalars", 0),
    Knob("BETA1", 0.9, "Adam beta1", 0, 1),
    Knob("BETA2", 0.95, "Adam beta2", 0, 1),
    Knob("GRAD_CLIP_NORM", 0.3, "global gradient norm clip; 0 = off", 0),
    Knob("EMA_DECAY", 0.997, "EMA of weights used for export; 0 = off", 0, 1),
    Knob("WARMDOWN_FRAC", 0.72, "the LR multiplier falls linearly from 1 toward 0 over this last fraction of training "
         "(progress: the larger of the clock's share and steps/ITERATIONS), held at MIN_LR once it reaches it", 0, 1),
    Knob("MIN_LR", 0.1, "LR multiplier floor in the warmdown", 0, 1),
]
EVAL_KNOBS = [  # all phases score the model reloaded from the artifact
    Knob("EVAL_SEQ_LEN", 2048, "window length of sliding and TTT evaluation", 8),
    Knob("EVAL_STRIDE", 64, "sliding-window stride: each window scores its last STRIDE targets; 0 = no sliding", 0),
    Knob("EVAL_SLIDING", AUTO, "with TTT, also score plain sliding windows as a reference: 1, 0, or auto = while "
         "the pace fits EVAL_BUDGET_SECONDS"),
    Knob("EVAL_BATCH_SEQS", 32, "windows per forward wherever windows are scored: training's checks, roundtrip, "
         "sliding, windowed TTT, SLOT (LoRA TTT batches TTT_LORA_DOCS documents)", 1),
    Knob("EVAL_COMPILE", AUTO, "torch.compile the eval forward: auto = where COMPILE applies (CUDA) | 1 | 0"),
    Knob("TTT_ENABLED", True, "score-first test-time training: per-document LoRA (TTT_LORA_RANK) or, at rank 0, "
         "over sliding windows"),
    Knob("TTT_LR", 0.005, "TTT SGD learning rate (cosine over chunks)", 0),
    Knob("TTT_EPOCHS", 3, "TTT passes over each already-scored chunk", 1),
    Knob("TTT_CHUNK_TOKENS", 32768, "windowed TTT (TTT_LORA_RANK=0): targets between two updates (a multiple of "
         "EVAL_STRIDE)", 64),
    Knob("TTT_FREEZE_BLOCKS", 0, "the matrices of physical layers 0..N-1 are not updated by TTT (their gains are)", 0),
    Knob("TTT_GRAD_CLIP", 1.0, "TTT gradient norm clip; 0 = off", 0),
    Knob("TTT_BATCH_SEQS", 32, "TTT training sequences per step (global)", 1),
    Knob("TTT_LORA_RANK", 80, "per-document LoRA TTT: the TTT phase scores each chunk's documents (split at BOS) "
         "with adapters of this rank on Q, K, V, O, MLP of every virtual layer and on the head, one set per "
         "document, stepped on each of its chunks once scored; then the global TTT update runs on those documents; "
         "0 = windowed TTT (sliding windows, TTT_CHUNK_TOKENS)", 0),
    Knob("TTT_LORA_PHASE_TOKENS", 131072, "LoRA TTT: the global TTT update follows the documents that start in "
         "each global chunk of this x GPUs tokens, each GPU scoring its share of them (by count): a rank's LoRA "
         "steps run one after another, so a chunk shared by more GPUs without growing would add steps, not split "
         "them", 1),
    Knob("TTT_LORA_TARGETS", "q,k,v,o,mlp,head", "the matrices LoRA TTT adapts, a comma "
         "list of q, k, v, o, mlp, head"),
    Knob("TTT_LORA_LR", 3e-4, "AdamW learning rate of the per-document adapters", 0),
    Knob("TTT_LORA_CHUNK", 48, "targets a document scores between two steps of its adapters (at most half of "
         "EVAL_SEQ_LEN: each target keeps half a window of context)", 1),
    Knob("TTT_LORA_STEPS", 32, "past this many chunks a document's chunk grows to 1/this of what it has "
         "scored (at most half a window): a long document takes ~this*ln(length) steps, not length/CHUNK", 1),
    Knob("TTT_LORA_DOCS", 64, "documents adapted side by side in one batch (a lone document runs beside a row "
         "without targets: a batch of one would compile graphs of its own)", 2),
    Knob("TTT_LORA_ROW_ALIGN", 1, "LoRA TTT: a batch's running rows are padded with rows without targets to a "
         "multiple of this (at most TTT_LORA_DOCS): fewer distinct (rows, length) shapes, each of which costs cuDNN "
         "attention a new plan inside the eval clock, for more padded rows through the forward; 1 = none", 1),
    Knob("TTT_LORA_GRAD_CONTEXT", 128, "LoRA TTT: a step whose chunk has more than this many tokens of context "
         "before it updates on the last this many only, in a pass of its own after the chunk is scored with its "
         "whole window (a shorter backward, one more forward per step); 0 = in the scoring pass", 0),
    Knob("ASYM_LOGIT_LR", 1.0, "TTT SGD learning rate of the two AsymLogit caps (their gradient is tiny next to a "
         "weight's: at TTT_LR they would not move)", 0),
    Knob("SLOT", "off", "off | context (fit a per-window delta on already-scored positions) | full (on the "
         "scored targets: leaks, valid:0)", choices=("off", "context", "full")),
    Knob("SLOT_STEPS", 8, "AdamW steps fitting each window's hidden-state delta", 1),
    Knob("SLOT_LR", 0.005, "SLOT AdamW learning rate", 0),
    Knob("NGRAM_TILT", True, "token-only n-gram tilt of the sliding, TTT and SLOT scores (not TTT's loss): boost "
         "the token that mostly followed the same context earlier in the val stream"),
    Knob("NGRAM_ORDER", "16", "n-gram order of the tilt: its context is the previous NGRAM_ORDER-1 tokens; several "
         "(e.g. 16,8) back off: a position without a hint at one order takes the next order's"),
    Knob("NGRAM_THRESHOLD", 0.8, "hint only where the top continuation so far has at least this share", 0, 1),
    Knob("NGRAM_BETA", 3.5, "the hinted token's probability is multiplied by e^(NGRAM_BETA (1 - p(hint))^NGRAM_GAMMA), "
         "then renormalized", 0),
    Knob("NGRAM_GAMMA", 1.0, "a boost that shrinks where the model already expects the hint (above); 0 = e^NGRAM_BETA "
         "everywhere", 0),
    Knob("DUMP_TOKEN_NLL", "", "write per-target NLL (float32) and bytes (uint16) of the final phase, in val order"),
    Knob("LEGALITY_CHECK", False, "before scoring, check each enabled eval mode on a val prefix (four TTT chunks, "
         "eager, its chunks capped at 8192 tokens): no score up to p moves when the tokens after p do, at points "
         "after updates and inside chunks. It cannot see a score that reads its own target (the tests do)"),
    Knob("EVAL_BUDGET_SECONDS", 600.0, "evaluation time budget (8-GPU scale), from the artifact's load on: phases "
         "are timed against it", 0),
    Knob("TTT_BUDGET_STOP", True, "stop TTT's updates (still scoring) once its pace projects past EVAL_BUDGET_SECONDS"),
]
EXPORT_KNOBS = [
    Knob("MATRIX_BITS", 6, "GPTQ bits of the block matrices", 2, 8),
    Knob("MATRIX_CLIP_SIGMAS", 12.35, "SDClip k of the matrices: row scale = k*std(row)/(2^(bits-1)-1); the clip "
         "search starts here", 0.1),
    Knob("MLP_CLIP_SCALE", 1.0, "the MLP matrices' SDClip k as a multiple of the attention matrices' "
         "(MATRIX_CLIP_SIGMAS); the clip search moves both", 0.5, 2.0),
    Knob("EMBED_BITS", 7, "GPTQ bits of the tied embedding", 2, 8),
    Knob("EMBED_CLIP_SIGMAS", 14.0, "SDClip k of the embedding", 0.1),
    Knob("GPTQ_CALIBRATION_BATCHES", 16, "global training batches for the GPTQ Hessians (the same tokens on any number "
         "of GPUs); 0 = plain rounding", 0),
    Knob("GPTQ_DAMP", "0.01", "GPTQ's damping, a multiple of mean(diag H) added to each Hessian's diagonal: one value, "
         "or three for the attention, MLP and embedding matrices (e.g. 0.01,0.02,0.005)"),
    Knob("GPTQ_RESERVE_SECONDS", 0.0, "taken off MAX_WALLCLOCK_SECONDS so Hessians are collected within it; "
         "0: measured before the clock", 0),
    Knob("CLIP_SEARCH_STEPS", 4, "extra GPTQ tries moving MATRIX_CLIP_SIGMAS to land just under the cap; 0 = off", 0),
    Knob("LQER_TOP_K", 3, "LQER: low-rank INT2 x INT4 corrections of the N largest GPTQ errors W - Wq; 0 = off", 0),
    Knob("LQER_RANK", 4, "rank of each LQER correction", 1),
    Knob("LQER_GROUP", 64, "LQER: values of the flattened INT4 factor per fp16 scale", 1),
    Knob("LQER_FIT", "plain", "LQER's low-rank fit of a GPTQ error E: plain (SVD of E) or activation (SVD of "
         "E H^1/2: the least output error tr(E H E^T))", choices=("plain", "activation")),
    Knob("AWQ_GROUPS", 0, "AWQ-lite: the N most salient groups of 64 input columns over the GPTQ'd matrices below 8 "
         "bits are rounded to int8 inside the same GPTQ solve; 0 = off", 0),
    Knob("ARTIFACT_CODER", "rans", "rans (the GPTQ codes of matrices at <= 6 bits by an arithmetic coder of their "
         "histogram, the rest brotli) | brotli (everything)", choices=("rans", "brotli")),
]
KNOBS = RUN_KNOBS + SCHEDULE_KNOBS + MODEL_KNOBS + OPTIMIZER_KNOBS + EVAL_KNOBS + EXPORT_KNOBS

# Settings no run needs to change (they were knobs once).
ADAM_EPS = 1e-8
TTT_MOMENTUM = 0.9
SEQ_REWARM_STEPS = 32  # after a TRAIN_SEQ_SCHEDULE switch the LR ramps back up over this many steps
MAX_TRAIN_SHAPES = 8  # torch.compile's recompile limit for one function (fullgraph fails past it)
CLIP_SEARCH_HEADROOM = 40_000  # bytes: the clip search stops once the artifact is this close under the cap

# Names we deliberately do not read: fail loudly instead of silently ignoring.
RETIRED_KNOBS = {
    "WARMDOWN_ITERS": "use WARMDOWN_FRAC (fraction of the wall clock)",
    "TIE_EMBEDDINGS": "embeddings are always tied",
    "EMBED_LR": "embeddings are always tied; use TIED_EMBED_LR",
    "HEAD_LR": "embeddings are always tied; use TIED_EMBED_LR",
    "VAL_BATCH_SIZE": "use EVAL_BATCH_SEQS (windows per forward)",
    "ADAM_EPS": f"now the constant ADAM_EPS={ADAM_EPS}",
    "TTT_MOMENTUM": f"now the constant TTT_MOMENTUM={TTT_MOMENTUM}",
    "CLIP_SEARCH_HEADROOM": f"now the constant CLIP_SEARCH_HEADROOM={CLIP_SEARCH_HEADROOM}",
    "DOC_ATTENTION": "removed: FlexAttention's document mask trained slower than causal cuDNN attention "
                     "(results/2026-12-06_doc_attention_cuda)",
    "FP8_MATMULS": "removed: FP8 training matmuls were slower at this model size (results/2026-12-06_fp8_clip_h100)",
}
# An env var that starts like a knob (TTT_, EVAL_, ...) but names none is probably a typo,
# unless the word is too common a start to tell.
KNOB_PREFIXES = tuple(sorted({k.split("_")[0] + "_" for k in [kn.name for kn in KNOBS] + list(RETIRED_KNOBS)
                              if "_" in k} - {"MAX_", "MIN_"}))
TYPO_PREFIXES = tuple(sorted(set(KNOB_PREFIXES) - {"DATA_", "ENABLE_", "LOG_", "NUM_", "RUN_"}))


def one_edit_apart(a: str, b: str) -> bool:
    """One substitution, insertion or deletion turns a into b (SEDD -> SEED)."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[i + 1:] == b[i + 1:] or a[i:] == b[i + 1:] or a[i + 1:] == b[i:]


def looks_like_knob(name: str, knobs: set[str]) -> bool:
    """A set env var that names no knob but starts like one or nearly spells one."""
    return name not in knobs and (name.startswith(TYPO_PREFIXES) or any(one_edit_apart(name, k) for k in knobs)
                                  or bool(difflib.get_close_matches(name, knobs, n=1, cutoff=0.8)))


BOOL_WORDS = {"1": True, "true": True, "0": False, "false": False}


def _parse(knob: Knob, raw: str):
    text = raw.strip()
    if isinstance(knob.default, (Auto, bool)):
        allowed = (AUTO,) * isinstance(knob.default, Auto)
        if text.lower() == AUTO and allowed:
            return AUTO
        if text.lower() not in BOOL_WORDS:
            raise UserError(f"env {knob.name}={raw!r}: expected {' | '.join(allowed + ('0', '1'))}")
        return BOOL_WORDS[text.lower()]
    kind = type(knob.default)
    try:
        value = kind(text)
    except ValueError:
        raise UserError(f"env {knob.name}={raw!r}: expected {kind.__name__} ({knob.doc})") from None
    if kind is float and not math.isfinite(value):
        raise UserError(f"env {knob.name}={raw!r}: expected a finite number")
    if knob.lo is not None and value < knob.lo or knob.hi is not None and value > knob.hi:
        bound = (f"in [{knob.lo}, {knob.hi}]" if knob.lo is not None and knob.hi is not None
                 else f">= {knob.lo}" if knob.lo is not None else f"<= {knob.hi}")
        raise UserError(f"env {knob.name}={raw!r}: expected a value {bound}")
    if knob.choices and value not in knob.choices:
        raise UserError(f"env {knob.name}={raw!r}: expected one of {'|'.join(knob.choices)}")
    return value


class Hyperparameters:
    """All knobs as lower-case attributes; `warnings` lists env vars that look like knobs but are not."""

    def __init__(self, env=None):
        env = os.environ if env is None else env
        for name, why in RETIRED_KNOBS.items():
            if name in env:
                raise UserError(f"env {name} is not supported: {why}")
        knobs = {kn.name for kn in KNOBS}
        self.warnings = [f"env {k} is set but no knob reads it (typo?)" for k in sorted(env) if looks_like_knob(k, knobs)]
        self.explicit = sorted(knobs & set(env))  # set in the environment, not defaults
        for kn in KNOBS:
            setattr(self, kn.name.lower(), _parse(kn, env[kn.name]) if kn.name in env else kn.default)
        validate(self)
        self.ngram_tilt = self.ngram_tilt and tilt_has_phase(self)  # the default, with nothing to tilt, logs as off

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})

    def items(self):
        return sorted((k, v) for k, v in vars(self).items() if k not in ("warnings", "explicit"))

    def replace(self, **changes) -> Hyperparameters:
        """A copy with these knobs (lower-case names) changed, not validated again: internal variants of a
        run's knobs (the legality check's, the eval priming's)."""
        unknown = [k for k in changes if not hasattr(self, k)]
        if unknown:
            raise AttributeError(f"no knob {unknown[0]}")
        other = copy.copy(self)
        vars(other).update(changes)
        return other


def knob_text(value) -> str:
    """A knob's value as its environment variable would spell it (bools as 0/1)."""
    return str(int(value) if isinstance(value, bool) else value)


def tilt_has_phase(hp) -> bool:
    """Whether a phase the n-gram tilt applies to runs (sliding windows, TTT or SLOT; never the roundtrip)."""
    return bool(hp.ttt_enabled or hp.eval_stride or hp.slot != "off")


def validate(hp: Hyperparameters):
    """Rules between knobs, checked before any compute is spent (WORLD_SIZE's in plan_batches)."""
    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(f"env {msg}")
    need("/" not in hp.run_id and os.sep not in hp.run_id,  # else the artifact's write fails, after training
         f"RUN_ID={hp.run_id!r}: expected a file name (no '/'): it names the log and the artifact")
    need(hp.num_heads % hp.num_kv_heads == 0, f"NUM_KV_HEADS={hp.num_kv_heads}: must divide NUM_HEADS={hp.num_heads}")
    need(hp.model_dim % hp.num_heads == 0 and (hp.model_dim // hp.num_heads) % 2 == 0,
         f"MODEL_DIM={hp.model_dim}: must give an even head dim with NUM_HEADS={hp.num_heads}")
    head_dim = hp.model_dim // hp.num_heads
    need(not (hp.smear_gate or hp.attn_gate) or hp.model_dim >= GATE_WINDOW,
         f"MODEL_DIM={hp.model_dim}: SMEAR_GATE and ATTN_GATE read {GATE_WINDOW} channels (set SMEAR_GATE=0 ATTN_GATE=0)")
    need(hp.rope_dims % 2 == 0 and hp.rope_dims <= head_dim,
         f"ROPE_DIMS={hp.rope_dims}: expected an even number <= head dim {head_dim}")
    need(not hp.num_loops or 0 <= hp.loop_start <= hp.loop_end < hp.num_layers,
         f"LOOP_START={hp.loop_start} LOOP_END={hp.loop_end}: expected 0 <= LOOP_START <= LOOP_END < "
         f"NUM_LAYERS={hp.num_layers}")
    need(not hp.num_loops or hp.enable_looping_at < 1,
         f"ENABLE_LOOPING_AT={hp.enable_looping_at}: must be < 1 with NUM_LOOPS={hp.num_loops} (the looped model is "
         "what is exported and scored: it must train), or NUM_LOOPS=0")
    for name in ("MUON_MOMENTUM", "MUON_MOMENTUM_WARMUP_START", "BETA1", "BETA2", "EMA_DECAY"):
        value = getattr(hp, name.lower())  # at 1 the average never moves: an EMA would export the initial weights
        need(value < 1, f"{name}={value}: expected a value in [0, 1) (at 1 its average never moves)")
    polar_steps = len(NS_SCHEDULES["polar"][1])
    need(hp.muon_ns_schedule != "polar" or hp.muon_backend_steps >= polar_steps,
         f"MUON_BACKEND_STEPS={hp.muon_backend_steps}: Polar Express needs >= {polar_steps} (its early "
         "polynomials overshoot; the last ones settle); use MUON_NS_SCHEDULE=quintic")
    need(not hp.max_wallclock_seconds or hp.max_wallclock_seconds > hp.gptq_reserve_seconds,
         f"MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds}: must exceed GPTQ_RESERVE_SECONDS="
         f"{hp.gptq_reserve_seconds} (the Hessians' share of the clock), or be 0 for no cap")
    need(not hp.ngram_tilt or "NGRAM_TILT" not in hp.explicit or tilt_has_phase(hp),
         "NGRAM_TILT=1: no phase to tilt (the roundtrip is never tilted): enable TTT, EVAL_STRIDE or SLOT")
    need(hp.eval_stride <= hp.eval_seq_len, f"EVAL_STRIDE={hp.eval_stride}: must be <= EVAL_SEQ_LEN={hp.eval_seq_len}")
    stride = hp.eval_stride or hp.eval_seq_len
    lora = hp.ttt_enabled and hp.ttt_lora_rank > 0
    need(not hp.ttt_enabled or lora or hp.ttt_chunk_tokens % stride == 0,
         f"TTT_CHUNK_TOKENS={hp.ttt_chunk_tokens}: must be a multiple of EVAL_STRIDE={stride} (a chunk holds "
         "whole windows)")
    need(hp.slot == "off" or not lora, f"SLOT={hp.slot}: runs on windowed TTT only: set TTT_LORA_RANK=0 "
         "(or TTT_ENABLED=0)")
    # the default fits a short window by its cut to half (chunk_size); a value asked for must fit as it is
    need(not lora or hp.ttt_lora_chunk <= hp.eval_seq_len // 2 or "TTT_LORA_CHUNK" not in hp.explicit,
         f"TTT_LORA_CHUNK={hp.ttt_lora_chunk}: LoRA TTT (TTT_LORA_RANK={hp.ttt_lora_rank}) needs it <= "
         f"EVAL_SEQ_LEN/2={hp.eval_seq_len // 2} (each target keeps half a window of context), or TTT_LORA_RANK=0")
    lora_targets(hp)  # its own errors
    gptq_damps(hp)
    ngram_orders(hp)
    shapes = len(train_shapes(hp))
    need(shapes <= MAX_TRAIN_SHAPES, f"TRAIN_SEQ_SCHEDULE={hp.train_seq_schedule!r}: training would reach {shapes} "
         f"(length, looped) shapes, each a compiled graph; at most {MAX_TRAIN_SHAPES}")
    need(not hp.val_max_tokens or hp.val_max_tokens > max(hp.train_seq_len, hp.eval_seq_len),
         f"VAL_MAX_TOKENS={hp.val_max_tokens}: must exceed TRAIN_SEQ_LEN and EVAL_SEQ_LEN (one window)")
    need(not hp.awq_groups or hp.gptq_calibration_batches,
         f"AWQ_GROUPS={hp.awq_groups}: ranks columns by the GPTQ Hessians: needs GPTQ_CALIBRATION_BATCHES > 0")
    need(hp.lqer_fit == "plain" or hp.gptq_calibration_batches,
         f"LQER_FIT={hp.lqer_fit}: weighs the error by the GPTQ Hessians: needs GPTQ_CALIBRATION_BATCHES > 0")
    need(not (hp.prequant_save and hp.eval_only), f"PREQUANT_SAVE={hp.prequant_save}: an EVAL_ONLY run exports nothing")


def seq_schedule(hp: Hyperparameters) -> list[tuple[int, float]]:
    """TRAIN_SEQ_SCHEDULE as [(length, progress it ends at)], ending with (TRAIN_SEQ_LEN, inf)."""
    out = []
    for item in filter(None, hp.train_seq_schedule.replace(" ", "").split(",")):
        m = re.fullmatch(r"(\d+)@(\d*\.?\d+)", item)
        if not m or int(m[1]) < 8 or not 0 < float(m[2]) < 1 or (out and float(m[2]) <= out[-1][1]):
            raise UserError(f"env TRAIN_SEQ_SCHEDULE={hp.train_seq_schedule!r}: expected 'L@f,...' with lengths "
                            f">= 8 and progress fractions rising within (0, 1), at {item!r}")
        out.append((int(m[1]), float(m[2])))
    out.append((hp.train_seq_len, math.inf))
    if any(a[0] == b[0] for a, b in zip(out, out[1:])):
        raise UserError(f"env TRAIN_SEQ_SCHEDULE={hp.train_seq_schedule!r}: two stretches in a row at one length "
                        f"(the last one is TRAIN_SEQ_LEN={hp.train_seq_len})")
    return out


def seq_len_at(schedule: list[tuple[int, float]], progress: float) -> int:
    return next(length for length, end in schedule if progress < end)


def train_shapes(hp: Hyperparameters) -> list[tuple[int, bool]]:
    """The (sequence length, looped) shapes that training reaches, in order: each is compiled before the clock."""
    schedule, shapes, start = seq_schedule(hp), [], 0.0
    for length, end in schedule:
        if not hp.num_loops or start < hp.enable_looping_at:
            shapes.append((length, False))
        if hp.num_loops and min(end, 1.0) > hp.enable_looping_at:
            shapes.append((length, True))
        start = end
    return shapes


def lora_targets(hp: Hyperparameters) -> tuple[str, ...]:
    """TTT_LORA_TARGETS as a tuple in LORA_TARGETS' order."""
    names = set(filter(None, hp.ttt_lora_targets.replace(" ", "").split(",")))
    if not names or names - set(LORA_TARGETS):
        raise UserError(f"env TTT_LORA_TARGETS={hp.ttt_lora_targets!r}: expected a comma list of "
                        f"{', '.join(LORA_TARGETS)}")
    return tuple(t for t in LORA_TARGETS if t in names)


def knob_numbers(text: str, cast) -> tuple:
    """A knob's comma-separated numbers, each cast; () where one does not parse (an empty item included)."""
    try:
        return tuple(cast(x) for x in text.replace(" ", "").split(","))
    except ValueError:
        return ()


def gptq_damps(hp: Hyperparameters) -> tuple[float, float, float]:
    """GPTQ_DAMP as (attention, MLP, embedding) dampings."""
    damps = knob_numbers(hp.gptq_damp, float)
    if len(damps) not in (1, 3) or not all(0 < d <= 1 for d in damps):
        raise UserError(f"env GPTQ_DAMP={hp.gptq_damp!r}: expected one damping in (0, 1], or three (attention, "
                        "MLP, embedding matrices)")
    return damps * 3 if len(damps) == 1 else damps


def ngram_orders(hp: Hyperparameters) -> tuple[int, ...]:
    """NGRAM_ORDER as the n-gram orders the tilt tries, first to last."""
    orders = knob_numbers(hp.ngram_order, int)
    if not orders or min(orders) < 2 or len(set(orders)) != len(orders):
        raise UserError(f"env NGRAM_ORDER={hp.ngram_order!r}: expected an order >= 2, or several different ones "
                        "(e.g. 16,8)")
    return orders


def knob_reference() -> str:
    """Markdown table of every knob (README's env reference is generated from this)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{k.name}` | `{int(k.default) if isinstance(k.default, bool) else k.default}` | "
             f"{k.doc.replace('|', chr(92) + '|')} |" for k in KNOBS]
    return "\n".join(rows)


# -----------------------------------------------------------------------------------------
# Distributed context and logging
# -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    cpu_group: object = None  # gloo group for host-side agreement (clocks, budgets); None = default group

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_flat_(self, tensors: list[torch.Tensor], divisor: int = 1):
        """Sum (then divide) a list of tensors across ranks in one flat all-reduce, in place."""
        if not self.enabled:
            return
        flat = self.all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
        if divisor != 1:
            flat.div_(divisor)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def all_reduce_max(self, value: float) -> float:
        """Max of a host number over ranks, through the CPU group: no wait on queued GPU work."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return t.item()

    def broadcast_object(self, obj):
        box = [obj]
        if self.enabled:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.enabled:
            dist.barrier()


TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def setup_distributed(hp: Hyperparameters, env=None) -> Dist:
    env = os.environ if env is None else env
    raw = env.get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"WORLD_SIZE={raw!r}: expected a positive integer (set by torchrun)")
    world_size = int(raw)
    if 8 % world_size:
        raise UserError(f"WORLD_SIZE={world_size}: must divide 8 (the global batch is split 8 ways)")
    missing = [v for v in TORCHRUN_VARS if v not in env]
    if world_size > 1 and missing:
        raise UserError(f"WORLD_SIZE={world_size} without {','.join(missing)}: launch several processes with "
                        "torchrun --standalone --nproc_per_node=N train_gpt.py")
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    cuda_ok = torch.cuda.is_available()
    if hp.device == "cuda" and not cuda_ok:
        raise UserError("env DEVICE=cuda: no CUDA device is available (use DEVICE=cpu or auto)")
    use_cuda = cuda_ok and hp.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    cpu_group = None
    if world_size > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        cpu_group = dist.new_group(backend="gloo") if use_cuda else None
    return Dist(rank, world_size, local_rank, device, cpu_group)


def log_path(log_dir: str, run_id: str) -> Path:
    return Path(log_dir) / f"{run_id}.txt"


LOG_TAKEN = "log {} already exists: RUN_ID is taken, choose another"


def silent(line: str) -> None:
    """A log that keeps nothing (the legality check's and the priming's passes, callers without a run)."""


class RunLog:
    """Rank 0 writes `key:value` lines to LOG_DIR/RUN_ID.txt and the console; never overwrites. Other ranks write
    nothing but the error that stops them (error()): an error only one rank meets must reach the log too."""

    def __init__(self, path: Path, dctx: Dist):
        self.path, self.file, self.is_main, self.rank = path, None, dctx.is_main, dctx.rank
        try:
            if self.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                # append mode: another rank's error line (error()) is never overwritten by a later line of this one
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o666)
                self.file = os.fdopen(fd, "w", encoding="utf-8")
        except FileExistsError:
            raise UserError(LOG_TAKEN.format(path)) from None
        except OSError as e:
            raise UserError(f"env LOG_DIR: cannot create log {path} ({e.strerror})") from None
        # No rank returns before rank 0 has created this run's log: an error line must never land in another's.
        dctx.broadcast_object(None)

    def __call__(self, msg: str):
        if self.file is not None:
            print(msg, flush=True)
            self.file.write(msg + "\n")
            self.file.flush()

    def error(self, msg: str):
        """The error line; from a rank other than 0, appended to rank 0's log as error:rankN:..."""
        if self.is_main:
            return self(msg)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"error:rank{self.rank}:{msg.removeprefix('error:')}\n")
        except OSError:
            pass  # its stderr line still says it


# -----------------------------------------------------------------------------------------
# Data: shards, the training stream, validation tokens
# Shard = 256 little-endian int32 header words (magic, version, token count) + uint16 tokens.
# -----------------------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, HEADER_WORDS = 20240520, 1, 256
HEADER_BYTES = HEADER_WORDS * 4


def open_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header and exact file size."""
    path = Path(path)
    if not path.is_file():  # a folder (or anything else) named like a shard
        raise UserError(f"shard {path}: not a file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise UserError(f"shard {path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if header[0] != SHARD_MAGIC:
        raise UserError(f"shard {path}: bad magic {header[0]} (expected {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise UserError(f"shard {path}: unsupported version {header[1]} (expected {SHARD_VERSION})")
    n = int(header[2])
    if size != HEADER_BYTES + 2 * n:
        raise UserError(f"shard {path}: size {size} != {HEADER_BYTES} + 2*{n} tokens from its header")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def shard_files(data_path: str, split: str, pattern: str = "") -> list[str]:
    pattern = pattern or os.path.join(data_path, f"fineweb_{split}_*.bin")
    files = sorted(f for f in glob.glob(pattern) if "_bytes_" not in os.path.basename(f))
    if not files:
        raise UserError(f"no {split} shards match {pattern}: download them ({DOWNLOAD_HINT}) or tokenize a corpus "
                        f"(python3 data/tokenize_jsonl.py DOCS.jsonl --out-dir data)")
    return files


def scores_whole_val(hp: Hyperparameters) -> bool:
    """Only a pass over every token of DATA_PATH's val shards is a valid score: not a prefix (VAL_MAX_TOKENS), nor
    other files (VAL_FILES naming a subset of them, or a train shard)."""
    if hp.val_max_tokens:
        return False
    if not hp.val_files:
        return True
    try:
        val_split = shard_files(hp.data_path, "val")
    except UserError:  # DATA_PATH holds no val split: VAL_FILES names something else
        return False
    return [os.path.realpath(f) for f in shard_files(hp.data_path, "val", hp.val_files)] == \
        [os.path.realpath(f) for f in val_split]


def check_token_range(tokens: np.ndarray, vocab_size: int, name: str):
    if len(tokens) and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise UserError(f"shard {name}: token {int(tokens[bad])} at offset {bad} >= VOCAB_SIZE={vocab_size}")


class TrainStream:
    """Deterministic stream of (seq_len+1)-token windows from the train shards. Each epoch draws (from
    SEED and the epoch) a random phase per shard and a permutation of all windows. Every rank computes
    the same global batch and reads only its rows: 1 GPU + accumulation equals 8 GPUs."""

    def __init__(self, files: list[str], seq_len: int, seed: int | tuple, vocab_size: int):
        self.files, self.vocab_size = files, vocab_size
        self.shards = [open_shard(f) for f in files]
        self.seq_len, self.seed = seq_len, seed
        self.epoch, self.order, self.pos = -1, np.empty(0, dtype=np.int64), 0
        if sum(len(s) for s in self.shards) < 2 * (seq_len + 1):
            raise UserError(f"train shards hold too few tokens for sequences of {seq_len} (TRAIN_SEQ_LEN, "
                            "TRAIN_SEQ_SCHEDULE)")
        if not any(len(s) > seq_len for s in self.shards):  # else every epoch holds a window, whatever its phases
            raise UserError(f"train shards: none holds a window of {seq_len + 1} tokens (TRAIN_SEQ_LEN, "
                            "TRAIN_SEQ_SCHEDULE)")

    def _new_epoch(self):
        self.epoch += 1
        rng = np.random.default_rng([*np.atleast_1d(self.seed), self.epoch])
        self.phase = [int(rng.integers(0, self.seq_len)) if len(s) > 2 * self.seq_len + 1 else 0 for s in self.shards]
        counts = [max(0, (len(s) - 1 - p) // self.seq_len) for s, p in zip(self.shards, self.phase)]
        self.offsets = np.cumsum([0] + counts)
        self.order, self.pos = rng.permutation(int(self.offsets[-1])), 0

    def _places(self, ids: np.ndarray) -> list[tuple[int, int]]:
        """(shard, first token) of windows `ids` of the current epoch (its phases and offsets)."""
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        start = np.asarray(self.phase)[shard] + (ids - self.offsets[shard]) * self.seq_len
        return list(zip(shard.tolist(), start.tolist()))

    def next_batch(self, n_seqs: int, rows: slice) -> np.ndarray:
        """Draw the next global batch of n_seqs windows; return rows[...] of it as int64. A batch that spans two
        epochs places each window in its own epoch's layout (the phases move from epoch to epoch)."""
        places = []
        while len(places) < n_seqs:
            if self.pos >= len(self.order):
                self._new_epoch()
            take = min(n_seqs - len(places), len(self.order) - self.pos)
            places += self._places(self.order[self.pos:self.pos + take])
            self.pos += take
        out = []
        for s, start in places[rows]:
            window = np.asarray(self.shards[s][start:start + self.seq_len + 1], dtype=np.int64)
            if window.max() >= self.vocab_size:  # checked as read: scanning 80 shards up front costs minutes
                check_token_range(window, self.vocab_size, f"{self.files[s]} (window at token {start})")
            out.append(window)
        return np.stack(out)


def load_val_tokens(files: list[str], vocab_size: int, max_tokens: int) -> np.ndarray:
    parts = []
    for f in files:
        toks = open_shard(f)
        check_token_range(toks, vocab_size, f)
        parts.append(np.asarray(toks))
    tokens = np.concatenate(parts)
    return tokens[:max_tokens + 1] if max_tokens else tokens


BOS_ID = 1  # every document of a shard starts with it


def sidecar_path(token_file: str) -> Path | None:
    """fineweb_val_000003.bin -> fineweb_val_bytes_000003.bin (per-token original bytes); None if no _NNNNNN.bin."""
    path = Path(token_file)
    m = re.fullmatch(r"(.*)_(\d+)\.bin", path.name)
    return path.with_name(f"{m[1]}_bytes_{m[2]}.bin") if m else None


def load_val_sidecars(files: list[str], n_tokens: int) -> np.ndarray | None:
    """The val shards' byte sidecars (shards of one uint16 byte count per token), cut like the tokens; or None."""
    sidecars = [sidecar_path(f) for f in files]
    present = [s is not None and s.is_file() for s in sidecars]
    if not any(present):
        return None
    if not all(present):
        missing = sidecars[present.index(False)] or files[present.index(False)]
        raise UserError(f"byte sidecar {missing}: missing, but other val shards have one (all or none)")
    parts = []
    for f, s in zip(files, sidecars):
        counts, n = open_shard(s), len(open_shard(f))
        if len(counts) != n:
            raise UserError(f"byte sidecar {s}: {len(counts)} entries, but {f} holds {n} tokens")
        parts.append(np.asarray(counts))
    return np.concatenate(parts)[:n_tokens]


# -----------------------------------------------------------------------------------------
# Tokenizer-agnostic bits per byte
# val_bpb = NLL in bits / UTF-8 bytes of the text; each target's byte count is fixed before scoring.
# By default from the pieces: '▁' is one byte wherever it stands, byte-fallback pieces one, control/unknown
# none; a leading '▁' right after a boundary (BOS) is free where SentencePiece drops it when decoding (a
# normalizing tokenizer's dummy prefix; a lossless one keeps it). CaseOps
# data (lower-cased text with case-operator tokens) ships a byte sidecar: each token's original bytes.
# -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class ByteLUT:
    base_bytes: np.ndarray         # int32 [vocab]
    has_leading_space: np.ndarray  # bool  [vocab]
    is_boundary: np.ndarray        # bool  [vocab]: a leading '▁' right after it is free (dropped by decoding)

    def target_bytes(self, prev: np.ndarray, tgt: np.ndarray) -> np.ndarray:
        space = self.has_leading_space[tgt] & ~self.is_boundary[prev]
        return self.base_bytes[tgt] + space.astype(np.int32)


@dataclasses.dataclass
class ValSet:
    """The val token stream and the bytes each target is charged (target t is tokens[t + 1])."""
    tokens: np.ndarray        # [N] token ids
    target_bytes: np.ndarray  # [N-1] int32
    byte_source: str          # "tokenizer" | "sidecar" | "synthetic" (eval_prime's made-up stream)

    @classmethod
    def from_lut(cls, tokens: np.ndarray, lut: ByteLUT) -> ValSet:
        return cls(tokens, lut.target_bytes(tokens[:-1], tokens[1:]), "tokenizer")

    @classmethod
    def from_sidecar(cls, tokens: np.ndarray, token_bytes: np.ndarray) -> ValSet:
        return cls(tokens, token_bytes[1:].astype(np.int32), "sidecar")

    def prefix(self, n_tokens: int) -> ValSet:
        return ValSet(self.tokens[:n_tokens], self.target_bytes[:n_tokens - 1], self.byte_source)

    def with_tokens(self, tokens: np.ndarray) -> ValSet:
        """Other tokens charged the same bytes (the legality check's perturbed stream)."""
        return dataclasses.replace(self, tokens=tokens)


# Private-use characters a CaseOps tokenizer reserves as pieces (TITLE, ALLCAPS, CAPNEXT, ESC).
CASE_OPERATORS = tuple(chr(c) for c in range(0xE001, 0xE005))


def load_tokenizer(path: str, vocab_size: int, vocab_owner: str = "VOCAB_SIZE"):
    """vocab_owner names where vocab_size came from, for the error: the env knob or an artifact."""
    if not os.path.isfile(path):
        raise UserError(f"tokenizer {path}: file not found (env TOKENIZER_PATH; download the data and tokenizer: "
                        f"{DOWNLOAD_HINT})")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(path)
    except Exception:
        raise UserError(f"tokenizer {path}: not a SentencePiece model") from None
    if sp.get_piece_size() != vocab_size:
        raise UserError(f"tokenizer {path}: vocab {sp.get_piece_size()} != {vocab_owner}={vocab_size}")
    if sp.piece_to_id("\u2581") == sp.unk_id():
        # Without a standalone '▁' a space is byte-encoded as 3 tokens (issue #897): bpb breaks.
        raise UserError(f"tokenizer {path}: no standalone '\u2581' piece, byte accounting would be wrong")
    if not sp.is_control(BOS_ID):  # a text piece there would be counted as bytes and split documents
        raise UserError(f"tokenizer {path}: id {BOS_ID} must be a control piece (the shards' document separator, "
                        f"BOS), got {sp.id_to_piece(BOS_ID)!r}")
    return sp


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_byte_lut(sp, vocab_size: int) -> ByteLUT:
    base = np.zeros(vocab_size, dtype=np.int32)
    space = np.zeros(vocab_size, dtype=bool)
    drops_first_space = sp.decode([sp.piece_to_id("\u2581")]) == ""
    boundary = np.full(vocab_size, drops_first_space)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.replace("\u2581", " ").encode("utf-8"))  # whitespace-only or -suffix pieces: one byte each
    return ByteLUT(base, space, boundary)


def is_caseops(sp) -> bool:
    """A tokenizer with case-operator pieces: its pieces are lower-cased text, so only a sidecar knows the bytes."""
    return any(sp.piece_to_id(op) != sp.unk_id() for op in CASE_OPERATORS)


def check_sidecar(token_bytes: np.ndarray, tokens: np.ndarray, lut: ByteLUT, files: list[str]):
    """Refuse sidecars of other tokens: BOS carries no bytes, no token more than its piece spells ('▁' = 1)."""
    where = f"byte sidecars of {Path(files[0]).parent}"
    if int(token_bytes.sum()) == 0:
        raise UserError(f"{where}: 0 bytes in total")
    wrong = (token_bytes > lut.base_bytes[tokens] + lut.has_leading_space[tokens]) | \
        ((tokens == BOS_ID) & (token_bytes != 0))
    if wrong.any():
        bad = int(np.argmax(wrong))
        raise UserError(f"{where} do not match the tokens or TOKENIZER_PATH: token {bad} (id {tokens[bad]}) is "
                        f"charged {token_bytes[bad]} bytes")


# -----------------------------------------------------------------------------------------
# Model
# A U-Net-shaped GPT: the first half of the (virtual) layers push their outputs, the second half
# pops them back in through (gated) skip weights. Each feature of the record stack is one
# ModelConfig knob. Pure math: the attention function is given at construction, depth recurrence
# is an argument of the forward, and GPTQ's statistics are taken by a `tap` the caller passes in.
# -----------------------------------------------------------------------------------------

# The block matrices live in four banks so that Muon orthogonalizes a whole bank at once: role ->
# (bank, part), layer i's matrix is bank[part * num_layers + i]. ROLE_INPUTS: the activation each
# role multiplies (GPTQ's Hessian is X^T X of it).
ROLES = {"q": ("qo_bank", 0), "o": ("qo_bank", 1), "k": ("kv_bank", 0), "v": ("kv_bank", 1),
         "up": ("mlp_up_bank", 0), "down": ("mlp_down_bank", 0)}
ROLE_INPUTS = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out", "up": "mlp_in", "down": "mlp_act"}
BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")


def bank_roles(bank: str) -> list[str]:
    """The roles a bank holds, in the order of their parts."""
    return sorted((r for r, (b, _) in ROLES.items() if b == bank), key=lambda r: ROLES[r][1])


def bank_rows(bank: str, layers: list[int], num_layers: int) -> list[int]:
    """Rows of `bank` holding any role's matrix of the given layers."""
    return [ROLES[r][1] * num_layers + i for r in bank_roles(bank) for i in layers]


def model_flops_per_token(cfg: ModelConfig, seq_len: int, looped: bool) -> float:
    """Training FLOPs per token: 6 x matmul weights per token (per visit, plus the head) + 12 x layers x
    width x seq_len for attention (PaLM's convention, not halved for causality)."""
    d, kv, hidden = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim, cfg.mlp_mult * cfg.model_dim
    per_layer = 2 * d * d + 2 * kv * d + 2 * hidden * d
    n_virtual = len(cfg.layer_order(looped))
    return 6 * (n_virtual * per_layer + cfg.vocab_size * d) + 12 * n_virtual * d * seq_len


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense spec peaks, for MFU


def device_peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    # In x's dtype: from torch 2.12, CUDA autocast returns rms_norm in fp32, which FlashAttention refuses for q, k.
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


def softcap_logits_lse(logits: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 softcapped logits z = cap*tanh(logits/cap) [tokens, vocab] and their log-sum-exp per token."""
    z = cap * torch.tanh(logits.float() / cap)
    lse = cap + torch.exp(z - cap).sum(-1).log() if cap <= 40 else torch.logsumexp(z, dim=-1)
    return z, lse


class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy (float32) of the softcapped logits cap*tanh(logits/cap). Autograd would
    keep the float32 softcapped logits, the step's largest activation; this keeps the (bf16) logits and
    one log-sum-exp per token and recomputes the rest. As |z| <= cap, lse = cap + log(sum(exp(z - cap)))
    needs no row max (one pass, not two) while exp(-2 cap) is a normal float32 (cap <= 40)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
        z, lse = softcap_logits_lse(logits, cap)
        ctx.save_for_backward(logits, targets, lse)
        ctx.cap = cap
        return lse - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        t = torch.tanh(logits.float() / ctx.cap)
        p = torch.exp(ctx.cap * t - lse.unsqueeze(-1))
        hit = torch.arange(logits.size(-1), device=logits.device) == targets.unsqueeze(-1)
        grad_z = (p - hit.float()) * grad_nll.unsqueeze(-1)
        return (grad_z * (1 - t * t)).to(logits.dtype), None, None


def asym_softcap(logits: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Float32 logits softcapped by caps[0] where positive and caps[1] where negative (AsymLogit)."""
    z = logits.float()
    cap = torch.where(z >= 0, caps[0], caps[1])
    return cap * torch.tanh(z / cap)


class AsymSoftcapCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy under asym_softcap, with gradients for the logits and both caps; keeps
    only the logits and one log-sum-exp per token, like SoftcapCrossEntropy (TTT's steps use this)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
        z = asym_softcap(logits, caps)
        lse = torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(logits, targets, lse, caps)
        return lse - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        logits, targets, lse, caps = ctx.saved_tensors
        x = logits.float()
        pos = x >= 0
        c = torch.where(pos, caps[0], caps[1])
        t = torch.tanh(x / c)
        hit = torch.arange(x.size(-1), device=x.device) == targets.unsqueeze(-1)
        g = (torch.exp(c * t - lse.unsqueeze(-1)) - hit.float()) * grad_nll.unsqueeze(-1)  # dNLL/dz
        dz_dc = t - x / c * (1 - t * t)  # d(c tanh(x/c))/dc
        gc = g * dz_dc
        grad_caps = torch.stack((gc[pos].sum(), gc[~pos].sum())).to(caps.dtype)
        return (g * (1 - t * t)).to(logits.dtype), None, grad_caps


def asym_softcap_nll(logits: torch.Tensor, targets: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy under asym_softcap; equal caps give SoftcapCrossEntropy's values."""
    flat = AsymSoftcapCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), caps)
    return flat.view_as(targets)


# XSA (exclusive self-attention): each head's output y minus its component along the token's own
# value v, y - (y.v / v.v) v, for y [B,T,Hkv,G,hd] (G query heads per KV head) and v [B,T,Hkv,hd];
# v.v is clamped at XSA_EPS as F.normalize does. xsa_reference is the definition (float32 at least);
# the model calls the op `xsa` (Fast paths), a Triton kernel each way on CUDA.

XSA_EPS = 1e-24


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or in its own dtype where that is wider (float64 in tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _xsa_dots(y: torch.Tensor, v: torch.Tensor, *others: torch.Tensor):
    """(v.v, 1/max(v.v, eps), [[x_g.v / v.v for each group g] for x in (y, *others)])."""
    n2 = v.square().sum(-1, keepdim=True)
    r = 1 / n2.clamp_min(XSA_EPS)
    return n2, r, [[(_wide(x[..., g, :]) * v).sum(-1, keepdim=True) * r for g in range(x.size(-2))]
                   for x in (y, *others)]


def xsa_reference(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    vf = _wide(v)
    _, _, (c,) = _xsa_dots(y, vf)
    return torch.stack([_wide(y[..., g, :]) - c[g] * vf for g in range(y.size(-2))], dim=-2).to(y.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dims: int) -> torch.Tensor:
    """Rotate the first rope_dims of the head dim (half-split pairs); pass the rest through."""
    rot, rest = x[..., :rope_dims], x[..., rope_dims:]
    a, b = rot.chunk(2, dim=-1)
    rot = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return torch.cat((rot, rest), dim=-1) if rest.numel() else rot


GATE_WINDOW = 12  # SmearGate and SparseGate read this many leading channels of their input


def smear(e: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """SmearGate: e_t + lam * sigmoid(w . e_t[:GATE_WINDOW]) * e_{t-1} for embeddings e [B,T,d] of
    tokens idx, except where idx_t is BOS: a document's first token never sees the previous one."""
    gate = torch.sigmoid(e[..., :GATE_WINDOW] @ w) * (idx != BOS_ID)
    return e + lam * gate[..., None] * F.pad(e[:, :-1], (0, 0, 1, 0))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B,T,H,hd] over k, v [B,T,Hkv,hd] (GQA), as [B,T,H,hd]: PyTorch SDPA
    with its own kernel choice. Every attention function the model may be given computes this."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


def pinned_attention(*backends):
    """causal_attention restricted to these SDPA kernels (torch.nn.attention.SDPBackend members)."""
    def attend(q, k, v):
        with torch.nn.attention.sdpa_kernel(list(backends)):
            return causal_attention(q, k, v)
    return attend


# Per-document LoRA (TTT_LORA_RANK): row b of a batch gets its own low-rank update of each adapted
# matrix, x -> x W^T + (alpha / r) (x A_b^T) B_b^T, with one (A, B) per role and virtual layer slot
# (a looped layer adapts separately on each pass) and one on the tied head. B starts at zero, so a
# fresh adapter is the identity; A ~ U(+-1/sqrt(in)).
LORA_ALPHA, LORA_SEED = 144.0, 0  # output scale ALPHA/rank as the record of parameter-golf PR #1855 set it
LORA_ROLES = ("q", "k", "v", "o", "mlp")  # "mlp": a parallel adapter from the MLP's input to its output
LORA_TARGETS = LORA_ROLES + ("head",)


class LoRA(nn.Module):
    def __init__(self, cfg: ModelConfig, batch: int, rank: int, device: torch.device,
                 targets: tuple[str, ...] = LORA_TARGETS):
        super().__init__()
        d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
        shapes = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "mlp": (d, d)}  # (in, out)
        slots = len(cfg.layer_order(True))
        dims = {f"{r}{j}": shapes[r] for j in range(slots) for r in LORA_ROLES if r in targets}
        dims |= {"head": (d, cfg.vocab_size)} if "head" in targets else {}
        self.a = nn.ParameterDict({k: nn.Parameter(torch.empty(batch, rank, i, device=device)) for k, (i, o) in dims.items()})
        self.b = nn.ParameterDict({k: nn.Parameter(torch.empty(batch, o, rank, device=device)) for k, (i, o) in dims.items()})
        self.scale = LORA_ALPHA / rank
        # Every row starts from the same A, drawn once from a fixed seed: a document's scores do not depend on the
        # batch or row it lands in. Kept on the device: a reset copies from it there, not from the host.
        g = torch.Generator().manual_seed(LORA_SEED)
        self.a_init = [((torch.rand(a.shape[1:], generator=g) * 2 - 1) * a.size(-1) ** -0.5).to(device)
                       for a in self.a.values()]
        self.reset()

    @torch.no_grad()
    def reset(self):
        for a, init in zip(self.a.values(), self.a_init):
            a.copy_(init)
        for b in self.b.values():
            b.zero_()

    def forward(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus the update of adapter `key` (if adapted) for x [n,T,in]: rows 0..n-1 of the batch."""
        if key not in self.a:
            return y
        n = x.size(0)
        return y + torch.bmm(torch.bmm(x, self.a[key][:n].transpose(1, 2)), self.b[key][:n].transpose(1, 2)) * self.scale


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, attention=causal_attention):
        super().__init__()
        self.cfg, self.attention = cfg, attention
        L, d, hd = cfg.num_layers, cfg.model_dim, cfg.head_dim
        kv, hidden = cfg.num_kv_heads * hd, cfg.mlp_mult * cfg.model_dim
        self.rope_dims = cfg.rope_dims or hd
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.qo_bank = nn.Parameter(torch.empty(2 * L, d, d))
        self.kv_bank = nn.Parameter(torch.empty(2 * L, kv, d))
        self.mlp_up_bank = nn.Parameter(torch.empty(L, hidden, d))
        self.mlp_down_bank = nn.Parameter(torch.empty(L, d, hidden))
        self.attn_scale = nn.Parameter(torch.ones(L, d))
        self.mlp_scale = nn.Parameter(torch.ones(L, d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(L, d), torch.zeros(L, d)), dim=1)) if cfg.x0_mix else None
        self.q_gain = nn.Parameter(torch.full((L, cfg.num_heads), cfg.qk_gain_init))
        n_skip = cfg.num_skips()
        self.skip_weights = nn.Parameter(torch.ones(n_skip, d))
        self.skip_gates = nn.Parameter(torch.zeros(n_skip, d)) if cfg.skip_gates else None
        # Zero-init gates: the smear starts off (lam 0), each attention head at half its output.
        self.smear_w = nn.Parameter(torch.zeros(GATE_WINDOW)) if cfg.smear_gate else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if cfg.smear_gate else None
        self.attn_gate = nn.Parameter(torch.zeros(L, cfg.num_heads * GATE_WINDOW)) if cfg.attn_gate else None
        self.logit_caps = nn.Parameter(torch.full((2,), cfg.logit_softcap)) if cfg.asym_logit else None  # (+, -)
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, self.rope_dims, 2, dtype=torch.float32) / self.rope_dims)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.ln_scales = [1.0 / math.sqrt(i + 1) if cfg.ln_scale else 1.0 for i in range(L)]
        self.reset_parameters()

    def replica(self, attention) -> GPT:
        """A copy of the model (weights included) computing attention with another function."""
        other = copy.deepcopy(self)
        other.attention = attention
        return other

    def w(self, role: str, i: int) -> torch.Tensor:
        """The matrix of `role` (see ROLES) in layer i: a view into its bank."""
        bank, part = ROLES[role]
        return getattr(self, bank)[part * self.cfg.num_layers + i]

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.tok_emb.weight, std=self.cfg.tied_embed_init_std)
        for role in ("q", "k", "v", "up"):
            for i in range(self.cfg.num_layers):
                nn.init.orthogonal_(self.w(role, i))
        for role in ("o", "down"):  # output projections start at zero: each block starts as identity
            for i in range(self.cfg.num_layers):
                self.w(role, i).zero_()

    def _linear(self, role: str, i: int, x: torch.Tensor, lora: LoRA | None, slot: int) -> torch.Tensor:
        y = F.linear(x, self.w(role, i))
        return y if lora is None else lora(f"{role}{slot}", x, y)

    def _attention(self, i: int, x: torch.Tensor, cos, sin, tap, lora=None, slot=0) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if tap is not None:
            tap(("attn_in", i), x)
        q = self._linear("q", i, x, lora, slot).view(B, T, H, hd)
        k = self._linear("k", i, x, lora, slot).view(B, T, Hkv, hd)
        v = self._linear("v", i, x, lora, slot).view(B, T, Hkv, hd)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = apply_rope(rms_norm(q), cos, sin, self.rope_dims) * self.q_gain[i].to(q.dtype)[:, None]
        k = apply_rope(rms_norm(k), cos, sin, self.rope_dims)
        y = self.attention(q, k, v)
        if i >= cfg.num_layers - cfg.xsa_last_n:
            y = xsa(y.reshape(B, T, Hkv, H // Hkv, hd), v)
        if self.attn_gate is not None:
            gate = torch.sigmoid(x[..., :GATE_WINDOW] @ self.attn_gate[i].view(H, GATE_WINDOW).T.to(x.dtype))
            y = y.reshape(B, T, H, hd) * gate[..., None].to(y.dtype)
        y = y.reshape(B, T, H * hd)
        if tap is not None:
            tap(("attn_out", i), y)
        return self._linear("o", i, y, lora, slot)

    def _mlp(self, i: int, x: torch.Tensor, tap) -> torch.Tensor:
        if tap is not None:
            tap(("mlp_in", i), x)
        h = F.linear(x, self.w("up", i))
        h = (F.leaky_relu(h, self.cfg.mlp_leaky_slope) if self.cfg.mlp_leaky_slope else F.relu(h)).square()
        if tap is not None:
            tap(("mlp_act", i), h)
        return F.linear(h, self.w("down", i))

    def _block(self, i: int, x: torch.Tensor, x0: torch.Tensor, cos, sin, tap, lora=None, slot=0) -> torch.Tensor:
        # Autocast runs the matmuls in bf16; the gains are cast to the residual stream's dtype
        # (RESIDUAL_DTYPE) so that float32 gains do not promote a bf16 stream back to float32.
        attn_scale, mlp_scale = self.attn_scale[i].to(x.dtype), self.mlp_scale[i].to(x.dtype)
        if self.resid_mix is not None:
            mix = self.resid_mix[i].to(x.dtype)
            x = mix[0] * x + mix[1] * x0
        s = self.ln_scales[i]
        attn_in = rms_norm(x) * s
        attn = attn_scale * self._attention(i, attn_in, cos, sin, tap, lora, slot)
        parallel = 0 <= self.cfg.parallel_residual_start <= i  # GPT-J style: both read the same input
        x = x + attn
        mlp_in = attn_in if parallel else rms_norm(x) * s
        mlp = self._mlp(i, mlp_in, tap)
        if lora is not None:
            mlp = lora(f"mlp{slot}", mlp_in, mlp)
        return x + mlp_scale * mlp

    def residual_dtype(self, device: torch.device) -> torch.dtype:
        """bfloat16 only where autocast runs the matmuls in bf16 (CUDA); float32 otherwise."""
        bf16 = self.cfg.residual_dtype == "bfloat16" and torch.is_autocast_enabled(device.type) \
            and torch.get_autocast_dtype(device.type) == torch.bfloat16
        return torch.bfloat16 if bf16 else torch.float32

    def hidden(self, idx: torch.Tensor, looped: bool, tap=None, lora: LoRA | None = None) -> torch.Tensor:
        """Final normed hidden states [B,T,d]; looped = with depth recurrence. tap(key, x), if given,
        sees the input of every matrix multiply (GPTQ's Hessians); lora adapts each row of the batch."""
        T = idx.size(1)
        freqs = torch.outer(torch.arange(T, device=idx.device, dtype=torch.float32), self.inv_freq)
        cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
        e = self.tok_emb(idx)
        if self.smear_w is not None:
            e = smear(e, idx, self.smear_w.to(e.dtype), self.smear_lambda.to(e.dtype))
        x = x0 = rms_norm(e).to(self.residual_dtype(idx.device))
        order = self.cfg.layer_order(looped)
        n_enc = len(order) // 2
        skips = []
        for j, i in enumerate(order):
            if j >= n_enc and skips:
                k = j - n_enc
                w = self.skip_weights[k].to(x.dtype) * skips.pop()
                if self.skip_gates is not None:
                    g = torch.sigmoid(self.skip_gates[k]).to(x.dtype)
                    x = g * x + (1 - g) * w
                else:
                    x = x + w
            x = self._block(i, x, x0, cos, sin, tap, lora, j)
            if j < n_enc:
                skips.append(x)
        return rms_norm(x)

    def logits(self, h: torch.Tensor, lora: LoRA | None = None) -> torch.Tensor:
        logits = F.linear(h, self.tok_emb.weight)
        return logits if lora is None else lora("head", h, logits)

    def nll_from_hidden(self, h: torch.Tensor, targets: torch.Tensor, fixed_cap: bool = False,
                        lora: LoRA | None = None) -> torch.Tensor:
        """Tied head + softcap + per-token cross entropy (float32, shape like targets). With AsymLogit the
        two learned caps apply unless fixed_cap (training: the fused one-cap loss, so they stay put)."""
        logits = self.logits(h, lora)
        if self.logit_caps is not None and not fixed_cap:
            return asym_softcap_nll(logits, targets, self.logit_caps)
        return SoftcapCrossEntropy.apply(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                         self.cfg.logit_softcap).view_as(targets)

    def nll_of_ids(self, h: torch.Tensor, ids: torch.Tensor, lora: LoRA | None = None) -> torch.Tensor:
        """-log p(id) for each of the ids [..., K] at every position of h [..., d] (no gradient): several
        entries of one distribution from a single head pass, each as nll_from_hidden computes it."""
        logits = self.logits(h, lora)
        logits = logits.view(-1, logits.size(-1))
        if self.logit_caps is not None:
            z = asym_softcap(logits, self.logit_caps)
            lse = torch.logsumexp(z, dim=-1)
        else:
            z, lse = softcap_logits_lse(logits, self.cfg.logit_softcap)
        return (lse.unsqueeze(-1) - z.gather(-1, ids.reshape(-1, ids.size(-1)))).view_as(ids)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, looped: bool, fixed_cap: bool = False) -> torch.Tensor:
        """Per-token NLL in nats, float32, shape like targets."""
        return self.nll_from_hidden(self.hidden(idx, looped), targets, fixed_cap)

    def tap_inputs(self, idx: torch.Tensor, looped: bool, tap):
        """tap(key, x) with the input of every matrix multiply, the tied head's included (GPTQ's Hessians): the
        forward without its loss, which no matrix reads."""
        tap(("head_in",), self.hidden(idx, looped, tap))


# -----------------------------------------------------------------------------------------
# Optimizer: Muon for the matrix banks, Adam for the embedding and the scalars
# Muon = momentum SGD whose update is replaced by its nearest semi-orthogonal matrix
# (Newton-Schulz), scaled so every matrix moves by a comparable RMS.
# -----------------------------------------------------------------------------------------

# Newton-Schulz schedules: (safety, coefficients). Iteration k applies X <- aX + (bA + cA^2)X, A = XX^T,
# with the k-th (a, b, c), the last repeating. "quintic" (Muon's original) leaves singular values in
# ~[0.7, 1.2]. "polar" is Polar Express (arXiv:2505.16932): one minimax polynomial per iteration, built
# for five, after which they are in ~[0.86, 1.14]; fewer are far off. The input is scaled below 1/safety
# so that bf16 rounding cannot push a singular value out of the range the first polynomial was built for.
NS_SCHEDULES = {
    "quintic": (1.0, ((3.4445, -4.7750, 2.0315),)),
    "polar": (1.02, ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                     (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                     (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                     (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                     (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))),
}


def newton_schulz(G: torch.Tensor, steps: int, schedule: str, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of each matrix in a batch [..., rows, cols] (bf16 on CUDA)."""
    safety, coeffs = NS_SCHEDULES[schedule]
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * safety + eps)
    for k in range(steps):
        a, b, c = coeffs[min(k, len(coeffs) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


def muon_direction(grad: torch.Tensor, buf: torch.Tensor, momentum: torch.Tensor, steps: int,
                   row_normalize: bool, schedule: str) -> torch.Tensor:
    """One bank shard's update direction: Nesterov momentum (buf updated in place), MuonEq-R row
    normalization, Newton-Schulz. One function so that torch.compile fuses the elementwise work
    around the matmuls; momentum is a 0-d tensor so its warm-up schedule never recompiles."""
    buf.mul_(momentum).add_(grad)
    update = grad + momentum * buf  # Nesterov
    if row_normalize:  # MuonEq-R
        update = update / update.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    return newton_schulz(update, steps, schedule)


class ParallelMuon(torch.optim.Optimizer):
    """Muon over parameter banks [B, rows, cols], sharded across ranks: reduce_scatter() hands each rank
    the summed gradient of its B_pad/world matrices (B padded to a multiple of the world size); step()
    runs the direction on that shard only and all-gathers the updates. No DDP; momentum is per shard."""

    def __init__(self, banks, lr, momentum, backend_steps, row_normalize, ns_schedule, weight_decay, direction,
                 dctx):
        super().__init__(banks, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.backend_steps, self.row_normalize, self.ns_schedule = backend_steps, row_normalize, ns_schedule
        self.direction = direction
        self.dctx, self.pending = dctx, []
        self.momentum = torch.zeros((), device=dctx.device)  # the group's momentum, as direction() takes it
        # Overlap communication with Newton-Schulz on GPUs. Gloo's async collectives intermittently abort
        # at exit, so on CPU each collective is waited for where it is issued (same arithmetic).
        self.overlap = dctx.device.type == "cuda"

    def _shard_size(self, p):
        return -(-p.size(0) // self.dctx.world_size)

    @torch.no_grad()
    def reduce_scatter(self):
        """Launch the gradient reduce-scatters (largest bank first); returns nothing, step() waits."""
        banks = sorted(self.param_groups[0]["params"], key=lambda p: -p.numel())
        self.pending = []
        for p in banks:
            n, world = self._shard_size(p), self.dctx.world_size
            if world == 1:
                self.pending.append((p, p.grad, None))
                continue
            full = p.grad.new_zeros((n * world, *p.shape[1:]))
            full[:p.size(0)] = p.grad
            shard = p.grad.new_empty((n, *p.shape[1:]))
            work = dist.reduce_scatter_tensor(shard, full, async_op=self.overlap)
            self.pending.append((p, shard, work if self.overlap else None))
            if not self.overlap:
                shard.div_(world)

    @torch.no_grad()
    def shard_grads(self) -> list[torch.Tensor]:
        """Wait for the reduce-scatters; the mean gradient shards (for clipping)."""
        for p, shard, work in self.pending:
            if work is not None:
                work.wait()
                shard.div_(self.dctx.world_size)
        self.pending = [(p, shard, None) for p, shard, _ in self.pending]
        return [shard for _, shard, _ in self.pending]

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        self.momentum.fill_(mom)
        gathers = []
        for p, grad, _ in self.pending:
            if "momentum_buffer" not in self.state[p]:  # setdefault would build (and fill) a zero buffer every step
                self.state[p]["momentum_buffer"] = torch.zeros_like(grad)
            buf = self.state[p]["momentum_buffer"]
            update = self.direction(grad, buf, self.momentum, self.backend_steps, self.row_normalize,
                                    self.ns_schedule).to(p.dtype)
            if self.dctx.enabled:
                full = update.new_empty((update.size(0) * self.dctx.world_size, *update.shape[1:]))
                gathers.append((p, full, dist.all_gather_into_tensor(full, update.contiguous(), async_op=self.overlap)))
            else:
                gathers.append((p, update, None))
        for p, full, work in gathers:  # the next bank's Newton-Schulz overlapped this gather
            if work is not None:
                work.wait()
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(full[:p.size(0)], alpha=-lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)
        self.pending = []


TEST_TIME_ONLY = ("logit_caps",)  # parameters only TTT moves: training neither uses nor updates them


def adam_params(model: GPT) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of what Adam trains: all but the banks (Muon's), the test-time-only ones and empty ones
    (a one-layer model's skip weights: nothing reads them, so no gradient ever comes). Chosen by name, not by
    shape: a new parameter of any shape is trained unless listed (resid_mix is 3-D)."""
    return [(n, p) for n, p in model.named_parameters() if n not in BANKS and n not in TEST_TIME_ONLY and p.numel()]


def build_optimizers(model: GPT, hp: Hyperparameters, dctx: Dist, direction=muon_direction):
    banks = [getattr(model, b) for b in BANKS]
    scalars = [p for n, p in adam_params(model) if n != "tok_emb.weight"]
    adam = torch.optim.AdamW(
        [dict(params=[model.tok_emb.weight], lr=hp.tied_embed_lr, weight_decay=hp.embed_wd),
         dict(params=scalars, lr=hp.scalar_lr, weight_decay=hp.adam_wd)],
        betas=(hp.beta1, hp.beta2), eps=ADAM_EPS, fused=dctx.device.type == "cuda")
    muon = ParallelMuon(banks, lr=hp.matrix_lr, momentum=hp.muon_momentum, backend_steps=hp.muon_backend_steps,
                        row_normalize=hp.muon_row_normalize, ns_schedule=hp.muon_ns_schedule,
                        weight_decay=hp.muon_wd, direction=direction, dctx=dctx)
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return [adam, muon]


def lr_multiplier(progress: float, warmdown_frac: float, min_lr: float) -> float:
    """1 until the last warmdown_frac of training, then linear toward 0, floored at min_lr."""
    if warmdown_frac <= 0 or progress < 1 - warmdown_frac:
        return 1.0
    return max((1 - progress) / warmdown_frac, min_lr)


def muon_momentum(step: int, hp: Hyperparameters) -> float:
    if hp.muon_momentum_warmup_steps <= 0:
        return hp.muon_momentum
    t = min(step / hp.muon_momentum_warmup_steps, 1.0)
    return (1 - t) * hp.muon_momentum_warmup_start + t * hp.muon_momentum


# -----------------------------------------------------------------------------------------
# Quantization and packing
# Full-Hessian GPTQ: each matrix W is quantized column by column (largest Hessian diagonal first),
# each column's rounding error pushed onto the columns not yet quantized through the inverse Hessian
# of the inputs, minimizing tr((W-Q) H (W-Q)^T). SDClip's row scale k * std(row) / (2^(bits-1) - 1)
# trades accuracy for compressed size: k lands the artifact under the cap. Hessians come from
# training batches only, inside the training budget. Small tensors pass as fp16.
# The artifact: magic, version, JSON tensor table and raw little-endian data, byte-shuffled and
# brotli-compressed in parallel streams, then the matrices' GPTQ codes as one rANS stream. Nothing in it
# is executed or unpickled on load.
# -----------------------------------------------------------------------------------------

ARTIFACT_MAGIC, ARTIFACT_VERSION = b"PGOLFART", 2
PASSTHROUGH_MAX_NUMEL = 65536
COMPRESS_CHUNK_BYTES = 4 << 20  # independent brotli streams, compressed in parallel threads
ARTIFACT_MAX_STREAMS = 64  # a bound for reading: a body of 256 MiB, far past any artifact near the cap


def row_scale(W: torch.Tensor, clip_sigmas: float, bits: int) -> torch.Tensor:
    """SDClip's per-row scale k * std(row) / (2^(bits-1) - 1), through fp16 as it is stored; at least fp16's
    smallest step, so that a constant row divides to finite codes."""
    return (clip_sigmas * W.float().std(dim=-1) / (2 ** (bits - 1) - 1)).half().clamp_min(2 ** -24).float()


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor | None, bits: int, clip_sigmas: float,
                  block: int = 128, damp: float = 0.01,
                  fine: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [B?, rows, cols], H [B?, cols, cols] or None for plain rounding) -> (q int8, scale fp16 [B?, rows]).
    fine (bool [B?, cols]): AWQ-lite's columns, rounded on the AWQ_BITS grid (row_scale at AWQ_BITS) in the same solve."""
    squeeze = W.ndim == 2
    W = (W[None] if squeeze else W).float().clone()
    B, rows, cols = W.shape
    qmax = 2 ** (bits - 1) - 1
    scale = row_scale(W, clip_sigmas, bits)  # [B, rows]
    if fine is not None:
        fine = (fine[None] if squeeze else fine).to(W.device)
        fine_scale, fine_max = row_scale(W, clip_sigmas, AWQ_BITS), 2 ** (AWQ_BITS - 1) - 1
    if H is None:
        H = torch.eye(cols, device=W.device).expand(B, cols, cols)
    H = (H[None] if H.ndim == 2 else H).float().clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0  # inputs that never fire: weight is irrelevant
    W.masked_fill_(dead[:, None, :], 0)
    live_mean = diag.sum(-1, keepdim=True) / (~dead).sum(-1, keepdim=True).clamp(min=1)
    diag.copy_(torch.where(dead, torch.where(live_mean > 0, live_mean, 1.0), diag))  # on the Hessian's own scale
    perm = torch.argsort(diag, dim=-1, descending=True)  # act-order
    W = W.gather(2, perm[:, None, :].expand(B, rows, cols))
    H = H.gather(1, perm[:, :, None].expand(B, cols, cols)).gather(2, perm[:, None, :].expand(B, cols, cols))
    if fine is not None:
        fine = fine.gather(1, perm)
    Hinv = inverse_hessian_factor(H, damp)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, :, i1:i2].clone(), Hinv[:, i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            w, s, m = W1[:, :, j], scale, qmax
            if fine is not None:  # per slice: this column on the fine grid or not
                f = fine[:, i1 + j, None]
                s, m = torch.where(f, fine_scale, scale), torch.where(f, float(fine_max), float(qmax))
            q = torch.clamp(torch.round(w / s), -m, m)
            Q[:, :, i1 + j] = q
            err = (w - q * s) / Hinv1[:, j, j][:, None]
            W1[:, :, j:] -= err[:, :, None] * Hinv1[:, j, j:][:, None, :]
            Err1[:, :, j] = err
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]
    Q = Q.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand(B, rows, cols)).to(torch.int8)
    scale = scale.half()
    return (Q[0], scale[0]) if squeeze else (Q, scale)


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H))^-1 per matrix; a failed one retries with 10x damping.
    In fp32 its last bits follow the BLAS's reduction order (on CPU, the thread count): an export's codes, hence its
    bytes, reproduce on one device and thread count, its quality on any."""
    eye = torch.eye(H.size(-1), device=H.device)
    mean_diag = torch.diagonal(H, dim1=-2, dim2=-1).mean(dim=-1)
    scale = torch.full_like(mean_diag, damp)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + (scale * mean_diag)[:, None, None] * eye)
        bad = info != 0
        if not bad.any():
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            bad = (info != 0) | ~torch.isfinite(U).all(dim=-1).all(dim=-1)
            if not bad.any():
                return U
        scale = torch.where(bad, scale * 10, scale)
    raise RuntimeError("GPTQ: Hessian not positive definite even with heavy damping")


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[..., None]


def dequantize_gptq(entry: dict) -> torch.Tensor:
    """A GPTQ'd entry's rows, AWQ-lite's columns (awq.cols) at their own row scale (awq.scale)."""
    W = dequantize_rows(entry["q"], entry["scale"])
    if "awq.cols" in entry:
        W = torch.where(entry["awq.cols"].bool()[..., None, :], dequantize_rows(entry["q"], entry["awq.scale"]), W)
    return W


def hessian_keys(name: str, num_layers: int) -> list[tuple] | None:
    """The recorded input Hessian of each matrix of a parameter, in bank order (None: not GPTQ'd)."""
    if name == "tok_emb.weight":
        return [("head_in",)]
    if name not in BANKS:
        return None
    return [(ROLE_INPUTS[role], i) for role in bank_roles(name) for i in range(num_layers)]


class HessianRecorder:
    """A model `tap` summing X^T X of every matrix input per key (each visit of a looped layer adds), and
    how many input rows each sum holds."""

    def __init__(self):
        self.hessians: dict[tuple, torch.Tensor] = {}
        self.rows: dict[tuple, int] = {}

    def __call__(self, key: tuple, x: torch.Tensor):
        x = gram_operand(x)
        with torch.autocast(x.device.type, enabled=False):  # the model runs under bf16 autocast: sum in fp32
            gram = input_gram(x)
            H = self.hessians.get(key)
            self.hessians[key] = gram if H is None else H.add_(gram)
        self.rows[key] = self.rows.get(key, 0) + x.size(0)


def gram_operand(x: torch.Tensor) -> torch.Tensor:
    """A matrix input [..., d] as the rows of its X^T X: in bf16 on CUDA, as the matrix multiplies it under
    autocast; elsewhere (CPU) in fp32."""
    return x.detach().reshape(-1, x.size(-1)).to(torch.bfloat16 if x.is_cuda else torch.float32)


def input_gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x in fp32 of x = gram_operand(...). On CUDA with an fp32 result from bf16: tensor cores, many times
    faster than fp32 products."""
    return torch.mm(x.T, x, out_dtype=torch.float32) if x.is_cuda else x.T @ x


def matrix_inputs(model: GPT, idx: torch.Tensor) -> list[tuple[tuple, torch.Tensor]]:
    """(key, gram_operand) of every matrix input of the looped model on idx, in the order the forward meets them.
    Compiled (Trainer.matrix_inputs) the forward is fused as training's is; the products are taken outside the
    graph (HessianRecorder), as torch.compile does not take torch.mm's out_dtype."""
    seen = []
    model.tap_inputs(idx, looped=True, tap=lambda key, x: seen.append((key, gram_operand(x))))
    return seen


# AWQ-lite: where the inputs are loud and the weights large, a group of input columns is rounded on a finer
# grid inside the same GPTQ solve (its error feedback included); the group's row scale is stored beside.
AWQ_BITS, AWQ_GROUP_COLS = 8, 64
AWQ_FIELD = re.compile(r"awq\.(cols|scale)")


def awq_select(state: dict[str, torch.Tensor], hessians: dict | None, num_layers: int, top_k: int,
               bits_of) -> dict[str, torch.Tensor]:
    """name -> bool [slices, cols]: the top_k groups of AWQ_GROUP_COLS input columns over every GPTQ'd matrix
    below AWQ_BITS, by saliency: per column the rms of its input (the Hessians are means of x x^T) times the
    column's mean |w|, summed over the group."""
    ranked = []
    for name, t in state.items():
        keys = hessian_keys(name, num_layers)
        if not (top_k and hessians and keys) or t.numel() <= PASSTHROUGH_MAX_NUMEL or bits_of(name) >= AWQ_BITS:
            continue
        W = t.detach().float().reshape(len(keys), *t.shape[-2:])
        rms = torch.stack([hessians[k].diagonal() for k in keys]).to(W.device).clamp_min(0).sqrt()
        n = W.size(-1) // AWQ_GROUP_COLS
        saliency = (rms * W.abs().mean(dim=1))[:, :n * AWQ_GROUP_COLS].reshape(len(keys), n, -1).sum(-1)
        ranked += [(-v, name, k, g) for k, row in enumerate(saliency.tolist()) for g, v in enumerate(row)]
    masks = {}
    for _, name, k, g in sorted(ranked)[:top_k]:
        t = state[name]
        mask = masks.setdefault(name, torch.zeros(t.numel() // t.shape[-1] // t.shape[-2], t.shape[-1], dtype=torch.bool))
        mask[k, g * AWQ_GROUP_COLS:(g + 1) * AWQ_GROUP_COLS] = True
    return masks


def awq_problem(entry: dict) -> str | None:
    """What is wrong with an entry's AWQ-lite fields, if anything (an entry may have none)."""
    f = {k: t for k, t in entry.items() if AWQ_FIELD.fullmatch(k)}
    if not f:
        return None
    if set(f) != {"awq.cols", "awq.scale"} or "q" not in entry or "scale" not in entry or entry["q"].ndim < 2:
        return "awq.cols and awq.scale belong together, on a GPTQ'd matrix"
    cols, scale, q = f["awq.cols"], f["awq.scale"], entry["q"]
    if cols.dtype != torch.int8 or tuple(cols.shape) != (*q.shape[:-2], q.size(-1)) or not ((cols == 0) | (cols == 1)).all():
        return "awq.cols is not a 0/1 mask over the matrix's input columns"
    if scale.dtype != torch.float16 or scale.shape != entry["scale"].shape or not torch.isfinite(scale.float()).all():
        return "awq.scale does not match the row scales"
    return None


GPTQ_KIND = re.compile(r"int(\d)_rows")  # the kind quantize_state gives a GPTQ'd matrix, by its bits


def quantize_state(state: dict[str, torch.Tensor], hessians: dict | None, num_layers: int,
                   matrix_bits: int, matrix_clip: float, embed_bits: int, embed_clip: float,
                   awq_groups: int = 0, mlp_clip_scale: float = 1.0,
                   damps: tuple[float, float, float] = (0.01, 0.01, 0.01)) -> dict[str, dict]:
    """name -> {kind, tensors}: GPTQ for the banks (the MLP's at mlp_clip_scale x matrix_clip) and the tied
    embedding (AWQ-lite's groups on the int8 grid, their row scales zero in slices without one), fp16 for the rest;
    damps: GPTQ's damping of the attention, MLP and embedding matrices."""
    mlp_banks = {ROLES[r][0] for r in ("up", "down")}

    def bits_clip_damp(name):
        if name == "tok_emb.weight":
            return embed_bits, embed_clip, damps[2]
        mlp = name in mlp_banks
        return matrix_bits, matrix_clip * (mlp_clip_scale if mlp else 1.0), damps[1 if mlp else 0]
    fine = awq_select(state, hessians, num_layers, awq_groups, lambda name: bits_clip_damp(name)[0])
    out = {}
    for name, t in state.items():
        keys = hessian_keys(name, num_layers)
        if keys is None or t.numel() <= PASSTHROUGH_MAX_NUMEL:
            out[name] = {"kind": "fp16", "w": t.detach().cpu().half()}
            continue
        bits, clip, damp = bits_clip_damp(name)
        H = torch.stack([hessians[k] for k in keys]) if hessians else None
        W = t.detach().float().reshape(len(keys), *t.shape[-2:])
        q, s = gptq_quantize(W, H.to(W.device) if H is not None else None, bits, clip, damp=damp,
                             fine=fine.get(name))
        out[name] = {"kind": f"int{bits}_rows", "q": q.reshape(t.shape).cpu(), "scale": s.reshape(t.shape[:-1]).cpu()}
        if name in fine:
            cols = fine[name]
            awq_scale = row_scale(W, clip, AWQ_BITS).cpu() * cols.any(dim=1, keepdim=True)
            out[name] |= {"awq.cols": cols.to(torch.int8).reshape(*t.shape[:-2], -1),
                          "awq.scale": awq_scale.half().reshape(t.shape[:-1])}
    refuse_nonfinite(out, state)
    return out


def refuse_nonfinite(qstate: dict[str, dict], state: dict[str, torch.Tensor]):
    """A stored float that is not finite (a non-finite weight, or a row scale or kept value past fp16's range)
    would load as NaN or inf rows and show only as a non-finite score: refused here, naming the tensor."""
    for name, e in qstate.items():
        for field, t in e.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                raise UserError(f"export: {name} {field} is not finite in fp16 (largest |weight| "
                                f"{state[name].detach().abs().max().item():.3g}; fp16 holds up to 65504)")


def dequantize_state(qstate: dict[str, dict]) -> dict[str, torch.Tensor]:
    return {name: e["w"].float() if e["kind"] == "fp16" else dequantize_matrix(e) for name, e in qstate.items()}


def dequantize_matrix(entry: dict) -> torch.Tensor:
    """GPTQ'd rows plus the LQER correction of each slice that has one."""
    W = dequantize_gptq(entry)
    slices = W.view(-1, *W.shape[-2:])  # a view: adding to a slice adds to W
    for k, fields in lqer_slices(entry).items():
        A, B = lqer_factors(fields, *W.shape[-2:])
        slices[k] += A @ B
    return W


# LQER: where GPTQ's error E = W - dequant(q) is largest (per bank slice or the embedding), a rank-r
# A B ~ E is added back. A (rows x r) is INT2 under one fp16 scale, B (r x cols) INT4 with one fp16
# scale per LQER_GROUP values, stored as extra fields of the matrix's entry (lqer{slice}.a, .a_scale,
# .b, .b_scale) whose shapes give rank and group: an artifact without them reads as before. A's codes
# are packed four to a byte (mostly zeros, which brotli then skips); B's near-uniform ones compress
# slightly better unpacked.

LQER_FIELD = re.compile(r"lqer(0|[1-9]\d*)\.(a|a_scale|b|b_scale)")  # one spelling per slice number
LQER_A_BITS, LQER_B_BITS = 2, 4
LQER_A_RANGE = 1.5  # the largest |A| maps to 1.5 codes: the few large entries survive, most small ones round to 0


def packed_width(n: int, bits: int) -> int:
    """Bytes that pack_codes makes of n codes: 8 // bits whole codes per byte (bits in 1, 2, 4, 8)."""
    return -(-n // (8 // bits))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed `bits`-bit codes [..., n] -> int8 bytes [..., packed_width(n, bits)], first code in the
    lowest bits; the last byte of a row is padded with the code for 0."""
    per = 8 // bits
    u = codes.to(torch.int32) + (1 << (bits - 1))  # offset to unsigned so the fields do not borrow
    u = F.pad(u, (0, -u.size(-1) % per), value=1 << (bits - 1))
    u = u.reshape(*u.shape[:-1], -1, per)
    packed = sum(u[..., j] << (bits * j) for j in range(per))
    return packed.to(torch.uint8).view(torch.int8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of pack_codes: int8 bytes [..., m] -> int8 codes [..., n]."""
    per = 8 // bits
    u = packed.view(torch.uint8).to(torch.int32)
    fields = torch.stack([(u >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], dim=-1)
    return (fields.reshape(*u.shape[:-1], -1)[..., :n] - (1 << (bits - 1))).to(torch.int8)


def lqer_fit(E: torch.Tensor, rank: int, group: int, H: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The quantized factors of a rank-`rank` approximation of E [rows, cols]: A = U S from the SVD of E (of
    E H^1/2 with the input Hessian H: the fit of least output error tr(E H E^T)), then B refitted by least
    squares to the quantized A (not V^T; with H the same pinv(A) E), which can only lower the error."""
    rank = min(rank, *E.shape)
    if H is not None:
        w, V = torch.linalg.eigh(H.double())
        U, S, _ = torch.linalg.svd(E.double() @ ((V * w.clamp_min(0).sqrt()) @ V.T), full_matrices=False)
        U, S = U.to(E.dtype), S.to(E.dtype)
    else:
        U, S, _ = torch.linalg.svd(E, full_matrices=False)
    A = U[:, :rank] * S[:rank]
    lo, hi = -(1 << (LQER_A_BITS - 1)), (1 << (LQER_A_BITS - 1)) - 1
    a_scale = (A.abs().max() / LQER_A_RANGE).clamp_min(1e-7).half()  # fp16 before rounding: load sees the same
    a_codes = torch.clamp(torch.round(A / a_scale.float()), lo, hi)
    B = torch.linalg.pinv(a_codes * a_scale.float()) @ E
    b_codes, b_scale = quantize_groups(B.reshape(-1), group, LQER_B_BITS)
    return {"a": pack_codes(a_codes.T.to(torch.int8), LQER_A_BITS).cpu(), "a_scale": a_scale.reshape(1).cpu(),
            "b": b_codes.cpu(), "b_scale": b_scale.cpu()}


def quantize_groups(x: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat x -> (int8 codes [groups, group] in [-2^(bits-1), 2^(bits-1)-1], fp16 scales [groups]);
    x is zero-padded to whole groups, and a group's largest |x| maps to qmax + 0.5 codes."""
    qmax = (1 << (bits - 1)) - 1
    g = F.pad(x, (0, -x.numel() % group)).reshape(-1, group)
    scale = (g.abs().amax(dim=1) / (qmax + 0.5)).half()
    codes = torch.clamp(torch.round(g / scale.float().clamp_min(1e-30)[:, None]), -qmax - 1, qmax)
    return codes.to(torch.int8), scale


def lqer_factors(fields: dict[str, torch.Tensor], rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored factor fields (checked by lqer_slices) -> (A [rows, r], B [r, cols]) in float32."""
    A = unpack_codes(fields["a"], LQER_A_BITS, rows).T.float() * fields["a_scale"].float()
    r = A.size(1)
    B = (fields["b"].float() * fields["b_scale"].float()[:, None]).reshape(-1)[:r * cols].reshape(r, cols)
    return A, B


def lqer_slices(entry: dict) -> dict[int, dict[str, torch.Tensor]]:
    """slice -> its four LQER fields, checked against each other and the matrix (ValueError if not)."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for field, t in entry.items():
        m = LQER_FIELD.fullmatch(field)
        if m:
            found.setdefault(int(m[1]), {})[m[2]] = t
    if not found:
        return found
    if "q" not in entry or entry["q"].ndim < 2:
        raise ValueError("LQER factors on a tensor that is not a GPTQ'd matrix")
    rows, cols = entry["q"].shape[-2:]
    for k, f in sorted(found.items()):
        problem = lqer_problem(f, rows, cols, entry["q"].numel() // (rows * cols), k)
        if problem:
            raise ValueError(f"lqer{k}: {problem}")
    return found


def lqer_problem(f: dict[str, torch.Tensor], rows: int, cols: int, n_slices: int, k: int) -> str | None:
    """What is wrong with slice k's LQER fields for a [n_slices, rows, cols] matrix, if anything."""
    if k >= n_slices:
        return f"slice {k} of a tensor of {n_slices}"
    if set(f) != {"a", "a_scale", "b", "b_scale"}:
        return f"has fields {', '.join(sorted(f))}; expected a, a_scale, b, b_scale"
    if [f[x].dtype for x in ("a", "a_scale", "b", "b_scale")] != [torch.int8, torch.float16, torch.int8, torch.float16]:
        return "unexpected element types"
    a, b = f["a"], f["b"]
    if a.ndim != 2 or a.size(0) < 1 or a.size(1) != packed_width(rows, LQER_A_BITS):
        return f"a has shape {list(a.shape)} for {rows} rows"
    if b.ndim != 2 or b.size(1) < 1 or b.size(0) != -(-a.size(0) * cols // b.size(1)):
        return f"b has shape {list(b.shape)} for rank {a.size(0)} and {cols} columns"
    if tuple(f["a_scale"].shape) != (1,) or tuple(f["b_scale"].shape) != (b.size(0),):
        return "scales do not match the factors"
    if not (torch.isfinite(f["a_scale"].float()).all() and torch.isfinite(f["b_scale"].float()).all()):
        return "non-finite scale"
    return None


def slice_label(name: str, k: int, num_layers: int) -> str:
    """A bank slice by role and layer (mlp_up_bank[3] -> up.3); other tensors by name."""
    if name not in BANKS:
        return name.removesuffix(".weight")
    return f"{bank_roles(name)[k // num_layers]}.{k % num_layers}"


def gptq_errors(state: dict[str, torch.Tensor], qstate: dict[str, dict]) -> list[tuple[float, str, int]]:
    """(||W - dequant(q)||_F, name, slice) of every GPTQ'd matrix, largest first (ties by name, slice)."""
    out = []
    for name, e in qstate.items():
        if "q" not in e:
            continue
        W = state[name].detach().float()
        E = W - dequantize_gptq(e).to(W.device)
        norms = torch.linalg.matrix_norm(E.reshape(-1, *W.shape[-2:])).tolist()
        out += [(n, name, k) for k, n in enumerate(norms)]
    return sorted(out, key=lambda t: (-t[0], t[1], t[2]))


def hessian_error(E: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H E^T) of a weight error E [..., rows, cols] under input Hessians H [..., cols, cols], summed over
    slices: the error a matrix's outputs feel, and GPTQ's objective."""
    return (E @ H * E).sum().item()


def apply_lqer(state: dict[str, torch.Tensor], qstate: dict[str, dict], top_k: int, rank: int, group: int,
               num_layers: int, hessians: dict | None = None, fit: str = "plain") -> list[dict]:
    """Add LQER fields to the entries of the top_k matrices by GPTQ error, in place, unless the rounded
    correction leaves the error no smaller: with Hessians the output error tr(E H E^T) of the slice (what the
    model feels: GPTQ shapes E into directions of small H, where a smaller ||E|| can still cost more), else
    ||E||_F. fit: LQER_FIT. Returns per matrix: name, slice, label, before, after (that error), kept."""
    report = []
    for _, name, k in gptq_errors(state, qstate)[:top_k]:
        e = qstate[name]
        W = state[name].detach().float()
        rows, cols = W.shape[-2:]
        W_k = W.reshape(-1, rows, cols)[k]
        E = W_k - dequantize_gptq(e).reshape(-1, rows, cols)[k].to(W.device)
        H = hessians[hessian_keys(name, num_layers)[k]].to(E.device, torch.float32) if hessians else None
        fields = lqer_fit(E, rank, group, H if fit == "activation" else None)
        A, B = (t.to(E.device) for t in lqer_factors(fields, rows, cols))  # exactly what loading will add
        error = (lambda D: torch.linalg.matrix_norm(D).item()) if H is None else (lambda D: hessian_error(D, H))
        before, after = error(E), error(E - A @ B)
        kept = after < before
        if kept:
            e.update({f"lqer{k}.{f}": t for f, t in fields.items()})
        report.append(dict(name=name, slice=k, label=slice_label(name, k, num_layers), before=before,
                           after=after if kept else before, kept=kept))
    return report


def field_bytes(qstate: dict[str, dict], pattern: re.Pattern) -> int:
    """About what the fields matching `pattern` (LQER's, AWQ-lite's) add to the artifact: their table rows and
    data compressed alone."""
    fields = [(name, f, t) for name, e in qstate.items() for f, t in e.items() if pattern.fullmatch(f)]
    if not fields:
        return 0
    rows = json.dumps([dict(name=name, field=f, dtype=str(t.dtype), shape=list(t.shape)) for name, f, t in fields])
    raw = b"".join(byte_shuffle(t.contiguous().numpy().tobytes(), t.element_size()) for _, _, t in fields)
    return len(brotli.compress(rows.encode() + raw, quality=11))


def byte_shuffle(buf: bytes, itemsize: int) -> bytes:
    """Group byte k of every element together: exponents and mantissas compress separately."""
    return buf if itemsize == 1 else np.frombuffer(buf, np.uint8).reshape(-1, itemsize).T.tobytes()


def byte_unshuffle(buf: bytes, itemsize: int) -> bytes:
    return buf if itemsize == 1 else np.frombuffer(buf, np.uint8).reshape(itemsize, -1).T.tobytes()


_DTYPES = {"int8": np.int8, "float16": np.float16}  # the only element types an artifact may hold

# rANS (range asymmetric numeral systems) codes the GPTQ codes of matrices at 6 bits or fewer: they have
# no structure beyond their histogram, and an arithmetic coder of it, unlike brotli's Huffman codes, spends
# fractional bits per code (results/2026-12-06_rans_coder). Independent coders interleave (symbol i goes to
# lane i mod lanes) so that numpy steps them as vectors: one lane per RANS_LANE_SYMBOLS symbols, at most
# RANS_MAX_LANES (each lane's final state costs 4 bytes); 32-bit states, 16-bit words, frequencies out of
# 2^RANS_PRECISION.
RANS_MAX_LANES, RANS_LANE_SYMBOLS, RANS_PRECISION, RANS_LOW = 1024, 16384, 16, 1 << 16
RANS_MAX_SYMBOLS = 1 << 28  # a bound for reading: no artifact under the cap holds more codes


def rans_coded(kind: str, field: str) -> bool:
    bits = GPTQ_KIND.fullmatch(kind)
    return field == "q" and bits is not None and int(bits[1]) <= 6


def rans_frequencies(symbols: np.ndarray) -> np.ndarray:
    """Each byte value's count scaled to sum 2^RANS_PRECISION, every present value at least 1 (the largest
    takes the rounding: it is at least 2^RANS_PRECISION/256, more than 256 roundings can take)."""
    counts = np.bincount(symbols, minlength=256)
    freq = np.where(counts > 0, np.maximum(1, np.round(counts * ((1 << RANS_PRECISION) / counts.sum()))), 0)
    freq = freq.astype(np.int64)
    freq[np.argmax(freq)] += (1 << RANS_PRECISION) - freq.sum()
    return freq.astype(np.uint64)


def rans_lanes(n: int) -> int:
    return min(RANS_MAX_LANES, max(1, -(-n // RANS_LANE_SYMBOLS)))


def rans_encode(symbols: np.ndarray, freq: np.ndarray) -> bytes:
    """uint8 symbols -> each lane's final state (uint32) + the words the lanes emitted, coded last to
    first so that decoding runs forward: word k is read at the step and lane that emitted it, in order."""
    cum, lanes = np.cumsum(freq) - freq, rans_lanes(len(symbols))
    steps = -(-len(symbols) // lanes)
    s = np.full(steps * lanes, np.argmax(freq), np.uint8)  # the padding decodes and is dropped
    s[:len(symbols)] = symbols
    s = s.reshape(steps, lanes)
    x = np.full(lanes, RANS_LOW, np.uint64)
    words, emitted = np.empty((steps, lanes), np.uint16), np.empty((steps, lanes), bool)
    for t in range(steps - 1, -1, -1):
        f, c = freq[s[t]], cum[s[t]]
        emitted[t] = e = x >= f << (32 - RANS_PRECISION)  # past this the state would overflow 32 bits
        words[t] = x & 0xFFFF
        x = np.where(e, x >> 16, x)
        x = (x // f << RANS_PRECISION) + x % f + c
    return x.astype("<u4").tobytes() + words[emitted].astype("<u2").tobytes()


def rans_decode(data: bytes, freq: np.ndarray, n: int) -> np.ndarray:
    """The inverse of rans_encode: n uint8 symbols. A stream that does not end with every word read and
    every lane back at its start state is corrupted (ValueError)."""
    lanes = rans_lanes(n)
    if (freq.shape != (256,) or (freq > 1 << RANS_PRECISION).any() or int(freq.sum()) != 1 << RANS_PRECISION
            or not 0 < n <= RANS_MAX_SYMBOLS or len(data) < 4 * lanes or len(data) % 2):
        raise ValueError("bad rANS frequencies, symbol count or stream length")
    cum, symbol = np.cumsum(freq) - freq, np.repeat(np.arange(256, dtype=np.uint8), freq.astype(np.int64))
    x = np.frombuffer(data[:4 * lanes], "<u4").astype(np.uint64)
    words = np.frombuffer(data[4 * lanes:], "<u2").astype(np.uint64)
    steps, read = -(-n // lanes), 0
    out = np.empty((steps, lanes), np.uint8)
    for t in range(steps):
        slot = x & ((1 << RANS_PRECISION) - 1)
        out[t] = s = symbol[slot]
        x = freq[s] * (x >> RANS_PRECISION) + slot - cum[s]
        need = x < RANS_LOW
        k = int(need.sum())
        if read + k > len(words):
            raise ValueError("rANS stream ends early")
        x[need] = x[need] << 16 | words[read:read + k]
        read += k
    if read != len(words) or (x != RANS_LOW).any():
        raise ValueError("rANS stream does not end where it began")
    return out.reshape(-1)[:n]


def pack_artifact(qstate: dict[str, dict], config: dict, coder: str = "rans") -> bytes:
    """The artifact's bytes: fields byte-shuffled and brotli-compressed, but with coder="rans" the GPTQ codes
    of matrices at <= 6 bits go, concatenated, through one rANS stream of their joint histogram."""
    table, chunks, coded, offset, n_coded = [], [], [], 0, 0
    for name, entry in qstate.items():
        for field, t in entry.items():
            if field == "kind":
                continue
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in _DTYPES:
                raise ValueError(f"pack_artifact: {name}.{field} has unsupported dtype {dtype}")
            row = dict(name=name, kind=entry["kind"], field=field, dtype=dtype, shape=list(t.shape))
            if coder == "rans" and rans_coded(entry["kind"], field):
                coded.append(t.contiguous().numpy().view(np.uint8).reshape(-1))
                table.append(row | dict(coder="rans", offset=n_coded, nbytes=t.numel()))
                n_coded += t.numel()
                continue
            raw = byte_shuffle(t.contiguous().numpy().tobytes(), t.element_size())
            table.append(row | dict(offset=offset, nbytes=len(raw)))
            chunks.append(raw)
            offset += len(raw)
    freq, rans = None, b""
    if n_coded:
        symbols = np.concatenate(coded)
        freq = rans_frequencies(symbols)
        rans = rans_encode(symbols, freq)
    header = json.dumps(dict(config=config, tensors=table, rans_freq=None if freq is None else freq.tolist(),
                             rans_symbols=n_coded), sort_keys=True).encode()
    body = struct.pack("<I", len(header)) + header + b"".join(chunks)
    pieces = [body[i:i + COMPRESS_CHUNK_BYTES] for i in range(0, len(body), COMPRESS_CHUNK_BYTES)]
    with ThreadPoolExecutor(max_workers=min(len(pieces), os.cpu_count() or 1)) as pool:
        streams = list(pool.map(lambda b: brotli.compress(b, quality=11), pieces))  # brotli drops the GIL
    payload = b"".join(streams) + rans  # neither has a checksum of its own: sha256 guards the payload
    return (ARTIFACT_MAGIC + struct.pack("<III", ARTIFACT_VERSION, len(streams), len(rans))
            + struct.pack(f"<{len(streams)}I", *map(len, streams)) + hashlib.sha256(payload).digest() + payload)


def decompress_stream(data: bytes, limit: int) -> bytes:
    """One brotli stream, refused (ValueError) past `limit` bytes of output or unfinished: a forged stream cannot
    claim more memory than pack_artifact's pieces take."""
    stream = brotli.Decompressor()
    out = stream.process(data, output_buffer_limit=limit + 1)
    if len(out) > limit or not stream.is_finished():
        raise ValueError("brotli stream too long or unfinished")
    return out


def table_entry_problem(e, data_bytes: int, codes: int) -> str | None:
    """What is wrong with one row of an artifact's tensor table (its slice of the brotli data, or of the rANS
    codes), or None."""
    keys = {"name", "kind", "field", "dtype", "shape", "offset", "nbytes"}
    if not isinstance(e, dict) or set(e) - {"coder"} != keys or e.get("coder", "rans") != "rans" \
            or not all(isinstance(e[k], str) for k in ("name", "kind", "field", "dtype")) \
            or e["dtype"] not in _DTYPES or not isinstance(e["shape"], list) or len(e["shape"]) > 8:
        return "unknown fields or element type"
    if not all(type(v) is int and v >= 0 for v in [e["offset"], e["nbytes"], *e["shape"]]) \
            or math.prod(max(d, 1) for d in e["shape"]) >= 1 << 40:  # numpy refuses such shapes even when empty
        return "offset, size and shape must be integers >= 0"
    coded = "coder" in e
    size = math.prod(e["shape"]) * (1 if coded else np.dtype(_DTYPES[e["dtype"]]).itemsize)
    if e["nbytes"] != size or e["offset"] + size > (codes if coded else data_bytes) or coded and e["dtype"] != "int8":
        return "its data does not fit its shape or the artifact"
    return None


def table_tiles(tensors: list[dict], data_bytes: int, codes: int) -> bool:
    """Whether the table's rows lie end to end over the brotli data and over the rANS codes, each byte in one row."""
    for coded, total in ((False, data_bytes), (True, codes)):
        end = 0
        for e in sorted((e for e in tensors if ("coder" in e) == coded), key=lambda e: e["offset"]):
            if e["offset"] != end:
                return False
            end += e["nbytes"]
        if end != total:
            return False
    return True


def entry_problem(entry: dict) -> str | None:
    """What is wrong with an entry's own fields, if anything: an fp16 tensor is one float16 `w`; a GPTQ'd matrix
    holds int8 codes `q` (not empty) and a float16 scale per row, beside which only LQER and AWQ fields (checked apart)."""
    if entry["kind"] == "fp16":
        return None if set(entry) == {"kind", "w"} and entry["w"].dtype == torch.float16 else "fp16 holds one float16 w"
    bits = GPTQ_KIND.fullmatch(entry["kind"])
    if bits is None or not 2 <= int(bits[1]) <= 8:
        return f"unknown kind {entry['kind'][:20]!r}"
    q, scale = entry.get("q"), entry.get("scale")
    if q is None or scale is None or q.dtype != torch.int8 or q.ndim < 2 or not q.numel() \
            or scale.dtype != torch.float16 or scale.shape != q.shape[:-1]:
        return "a GPTQ'd matrix holds int8 codes q and a float16 scale per row"
    if any(f not in ("kind", "q", "scale") and not LQER_FIELD.fullmatch(f) and not AWQ_FIELD.fullmatch(f) for f in entry):
        return "unknown fields"
    return None


class ArtifactCheck(ValueError):
    """A named check of unpack_artifact that failed (the reason goes into its error line)."""


def unpack_artifact(blob: bytes, source: str = "artifact") -> tuple[dict[str, dict], dict]:
    head = len(ARTIFACT_MAGIC) + 8
    if len(blob) < head or blob[:len(ARTIFACT_MAGIC)] != ARTIFACT_MAGIC:
        raise UserError(f"{source}: not a parameter-golf artifact (bad magic)")
    version, n_streams = struct.unpack("<II", blob[len(ARTIFACT_MAGIC):head])
    if version not in (1, ARTIFACT_VERSION):  # version 1: brotli only, no rANS section
        raise UserError(f"{source}: artifact version {version}, this code reads 1 and {ARTIFACT_VERSION}")
    try:
        rans_len = struct.unpack("<I", blob[head:head + 4])[0] if version > 1 else 0
        head += 4 if version > 1 else 0
        if n_streams > ARTIFACT_MAX_STREAMS:  # each may inflate to a chunk from a few bytes: bound them all
            raise ArtifactCheck(f"{n_streams} brotli streams, more than {ARTIFACT_MAX_STREAMS}")
        sizes = struct.unpack(f"<{n_streams}I", blob[head:head + 4 * n_streams])
        start = head + 4 * n_streams + 32
        ends = np.cumsum((start,) + sizes)
        if ends[-1] + rans_len != len(blob) or hashlib.sha256(blob[start:]).digest() != blob[start - 32:start]:
            raise ArtifactCheck("its size or checksum does not match")
        body = b"".join(decompress_stream(blob[a:b], COMPRESS_CHUNK_BYTES) for a, b in zip(ends[:-1], ends[1:]))
        (hlen,) = struct.unpack("<I", body[:4])
        meta = json.loads(body[4:4 + hlen])
        config = meta.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("model", {}), dict):
            raise ArtifactCheck("its config is not a mapping (with a mapping for the model)")
        tensors = list(meta["tensors"])
        data_bytes, n = len(body) - 4 - hlen, meta.get("rans_symbols", 0) if rans_len else 0
        for e in tensors:
            if problem := table_entry_problem(e, data_bytes, n if type(n) is int else 0):
                label = e.get("name") if isinstance(e, dict) else e
                raise UserError(f"{source}: corrupted tensor table entry {str(label)[:40]}: {problem}")
        if not table_tiles(tensors, data_bytes, n):  # as pack_artifact writes them: no byte read twice, before decoding
            raise ArtifactCheck("its tensor table does not cover its data exactly once")
        codes = np.zeros(0, np.uint8)
        if rans_len:
            freq = meta["rans_freq"]
            if not all(type(v) is int and v >= 0 for v in [n, *freq]):
                raise ArtifactCheck("its rANS header holds other than integers >= 0")
            try:
                codes = rans_decode(blob[ends[-1]:], np.array(freq, np.uint64), n)
            except ValueError as e:
                raise ArtifactCheck(f"rANS: {e}") from None
    except ArtifactCheck as e:  # a check of ours: say which
        raise UserError(f"{source}: corrupted or truncated artifact ({e})") from None
    except UserError:
        raise
    except Exception:  # the data itself would not parse
        raise UserError(f"{source}: corrupted or truncated artifact") from None
    data, qstate = body[4 + hlen:], {}
    for e in tensors:
        ndtype = _DTYPES[e["dtype"]]
        if "coder" in e:  # table_entry_problem: the only coder is rans
            arr = codes[e["offset"]:e["offset"] + e["nbytes"]].view(np.int8).reshape(e["shape"]).copy()
        else:
            raw = byte_unshuffle(data[e["offset"]:e["offset"] + e["nbytes"]], np.dtype(ndtype).itemsize)
            arr = np.frombuffer(raw, dtype=ndtype).reshape(e["shape"]).copy()
        entry = qstate.setdefault(e["name"], {"kind": e["kind"]})
        if e["field"] in entry or entry["kind"] != e["kind"]:
            raise UserError(f"{source}: corrupted tensor table entry {e['name'][:40]}: a field twice, or two kinds")
        entry[e["field"]] = torch.from_numpy(arr)
    for name, entry in qstate.items():
        if problem := entry_problem(entry):
            raise UserError(f"{source}: corrupted entry {name[:40]}: {problem}")
        try:
            lqer_slices(entry)
        except ValueError as err:
            raise UserError(f"{source}: corrupted LQER entry {name}: {err}") from None
        if problem := awq_problem(entry):
            raise UserError(f"{source}: corrupted AWQ entry {name}: {problem}")
    return qstate, config


def check_writable(folder: Path, knob: str):
    """Fail before training, not after it, if an output cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".write_test.{os.getpid()}", "wb") as f:
            f.write(b"\0" * 4096)
        (folder / f".write_test.{os.getpid()}").unlink()
    except OSError as e:
        raise UserError(f"{knob} {folder}: not writable ({e.strerror})") from None


def write_atomic(path: Path, data: bytes, overwrite: bool = True):
    """temp file + fsync + rename: never a half-written file, nothing left by a failed write; with
    overwrite=False an existing file is never replaced."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            link_no_clobber(tmp, path)
    except FileExistsError:
        raise UserError(f"{path} already exists: it is never overwritten (choose another RUN_ID)") from None
    except OSError as e:
        raise UserError(f"{path}: write failed ({e.strerror}); nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)


# What link(2) answers where the filesystem has no hard links (some network and FUSE filesystems).
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV}


def link_no_clobber(tmp: Path, path: Path):
    """Give tmp the name path unless path exists, with no check-then-write race: a hard link, or where
    there are none an O_EXCL claim of the name and a rename over the empty claim."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    try:
        os.replace(tmp, path)
    except BaseException:  # never leave the empty claim behind: it would block a rerun
        path.unlink(missing_ok=True)
        raise


def artifact_path(hp: Hyperparameters, run_id: str, over_limit: bool = False) -> Path:
    suffix = "OVER_LIMIT_NOT_VALID" if over_limit else f"int{hp.matrix_bits}"
    return Path(hp.artifact_dir) / f"final_model_{run_id}.{suffix}.br"


# Artifacts from before a field existed were trained without it (RESIDUAL_DTYPE: a float32 stream).
# x0_mix: files from before it was a knob hold resid_mix (never trained then, so at its init: the same function).
LEGACY_MODEL_FIELDS = {"residual_dtype": "float32", "smear_gate": False, "attn_gate": False, "asym_logit": False,
                       "x0_mix": True}
# Fields this version no longer has, at their off value: a file that recorded one off loads, one trained with it
# on cannot (DOC_ATTENTION: slower than cuDNN attention, results/2026-12-06_doc_attention_cuda).
RETIRED_MODEL_FIELDS = {"doc_attention": False}


def saved_model_config(fields: dict, source: str) -> ModelConfig:
    """The ModelConfig of the model fields an artifact or a PREQUANT_SAVE file recorded."""
    used = sorted(k.upper() for k, off in RETIRED_MODEL_FIELDS.items() if fields.get(k, off) != off)
    if used:
        raise UserError(f"{source}: trained with {', '.join(used)}, which this version of the script no longer has")
    missing = sorted({f.name for f in dataclasses.fields(ModelConfig)} - set(fields) - set(LEGACY_MODEL_FIELDS))
    if missing:
        raise UserError(f"{source}: its model config lacks {', '.join(missing)} (written by a different version of "
                        f"this script?)")
    values = LEGACY_MODEL_FIELDS | {k: v for k, v in fields.items() if k not in RETIRED_MODEL_FIELDS}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise UserError(f"{source}: its model config does not fit this version of the script (unknown fields: "
                        f"{', '.join(map(str, unknown))[:80]})")
    try:  # what a training run's knobs must be (types, bounds, the rules between them), before a model is built
        return Hyperparameters({k.upper(): knob_text(v) for k, v in values.items()}).model_config()
    except UserError as e:
        raise UserError(f"{source}: its model config is not one a run could train ({str(e).removeprefix('env ')})") from None


def artifact_train_seq_len(meta: dict, path: Path) -> int:
    """The training sequence length an artifact records: the window its roundtrip phase scores with."""
    seq_len = meta.get("train_seq_len")
    if type(seq_len) is not int or seq_len < 1:
        raise UserError(f"artifact {path}: its config has no positive integer train_seq_len (got {seq_len!r}; "
                        "written by a different version of this script?)")
    return seq_len


def read_artifact(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise UserError(f"env EVAL_ONLY={path}: artifact file not found")
    return unpack_artifact(path.read_bytes(), str(path))


def artifact_model(qstate: dict, meta: dict, path: Path, device: torch.device, attention) -> GPT:
    """The dequantized model of an unpacked artifact, running `attention`."""
    cfg = saved_model_config(meta.get("model", {}), f"artifact {path}")
    with torch.device("meta"):  # the shapes its config gives, before any memory is spent on them
        shapes = {k: v.shape for k, v in GPT(cfg, attention).state_dict().items()}
    try:
        state = dequantize_state(qstate)
        wrong = sorted(set(shapes) ^ set(state)) or [k for k in shapes if state[k].shape != shapes[k]]
        if wrong:
            raise KeyError(f"{wrong[0]} missing, unexpected or of another shape")
        model = GPT(cfg, attention).to(device)
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"artifact {path}: tensors do not match its model config ({str(e)[:120]})") from None
    return model


def check_artifact_tokenizer(meta: dict, path: Path, tokenizer_sha: str, tokenizer_path: str):
    """An artifact scored with another tokenizer gives a meaningless bpb: refuse it."""
    recorded = meta.get("tokenizer_sha256")
    if recorded is not None and recorded != tokenizer_sha:
        raise UserError(f"artifact {path}: trained with tokenizer sha256 {recorded[:16]}, but TOKENIZER_PATH="
                        f"{tokenizer_path} has {tokenizer_sha[:16]}: point TOKENIZER_PATH at the training tokenizer")


# -----------------------------------------------------------------------------------------
# Compilation: torch.compile on CUDA, Inductor's settings, and its caches kept in a file (COMPILE_CACHE)
# so that a run on a fresh machine skips what an earlier run compiled.
# -----------------------------------------------------------------------------------------

def compile_applies(hp: Hyperparameters, device: torch.device) -> bool:
    """COMPILE: torch.compile on CUDA only (CPU runs are tests and tiny configs)."""
    return hp.compile and device.type == "cuda"


def configure_inductor():
    """torch 2.11's mix-order reductions fused the gains' column sums into the RMSNorm backward kernels,
    which then ran far below memory speed on an H100 (off: results/2026-11-24_speed_profiles_h100/).
    AOTAutograd's cache skips graphs holding an autograd.Function (training's softcap loss) unless allowed, so
    every start re-traced and re-partitioned each training graph; its key holds the Function's traced forward and
    backward, so an edited Function misses (results/2026-12-06_warm_start_cpu/). It skips them too where
    sdpa_kernel() pins cuDNN (pinned_attention): the graph then calls two helpers that map kernel names (held in
    the key) to SDPA's kernel switches, nothing else (results/2026-12-06_warm_start_h200/)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    if hasattr(inductor_config.triton, "mix_order_reduction"):
        inductor_config.triton.mix_order_reduction = False
    if hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):
        functorch_config.autograd_cache_allow_custom_autograd_functions = True
    if hasattr(inductor_config, "unsafe_marked_cacheable_functions"):
        for helper in ("_backend_from_string", "_sdpa_kernel"):
            inductor_config.unsafe_marked_cacheable_functions.setdefault(f"torch.nn.attention.{helper}",
                                                                         torch.__version__)


def compile_cache_counts() -> dict[str, int]:
    """What torch.compile's caches have served in this process: Inductor's FX graphs, AOTAutograd's joint graphs;
    and compile_ms, the time spent inside torch.compile's graph builds (Dynamo's trace, then the compile or the
    cache load; a backward compiled at its first call is not in it): of a warm start, what is not the graphs' runs."""
    from torch._dynamo.utils import compilation_time_metrics, counters
    fx, aot = counters["inductor"], counters["aot_autograd"]
    counts = dict(fxgraph_hits=fx["fxgraph_cache_hit"], fxgraph_misses=fx["fxgraph_cache_miss"],
                  aot_hits=aot["autograd_cache_hit"], aot_misses=aot["autograd_cache_miss"],
                  aot_bypasses=aot["autograd_cache_bypass"])
    builds = compilation_time_metrics.get("_compile.compile_inner")
    return counts | ({"compile_ms": int(1000 * sum(builds))} if builds is not None else {})


def cache_counts_line(before: dict[str, int] | None = None) -> str:
    """compile_cache_counts as key:value fields, since `before` (an earlier reading) where given."""
    return " ".join(f"{k}:{v - (before or {}).get(k, 0)}" for k, v in compile_cache_counts().items())


def load_compile_cache(path: str, log) -> bool:
    """COMPILE_CACHE: torch.compile's caches (inductor graphs, AOTAutograd) from the file, before anything compiles;
    whether there was one. Its folder must take the file that a run without one writes."""
    if not path:
        return False
    check_writable(Path(path).parent, "COMPILE_CACHE's folder")
    if not os.path.exists(path):
        return False
    quiet = logging.getLogger("torch.compiler._cache")  # a file it cannot read: a traceback there, None here
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        data = Path(path).read_bytes()
        loaded = torch.compiler.load_cache_artifacts(data)
    except Exception as e:
        raise UserError(f"env COMPILE_CACHE={path}: cannot be loaded ({type(e).__name__}: {str(e)[:120]})") from None
    finally:
        quiet.setLevel(level)
    if loaded is None:
        raise UserError(f"env COMPILE_CACHE={path}: not a torch.compile cache of this torch; remove it and the run "
                        "writes a new one")
    log(f"compile_cache:loaded path:{path} bytes:{len(data)}")
    return True


def save_compile_cache(path: str, loaded: bool, log):
    """COMPILE_CACHE: a run that found no file writes what it compiled; one that loaded the file keeps it (torch
    saves only what a process compiled or used, so rewriting would drop, say, the training graphs after an
    EVAL_ONLY run) and says so where it had to compile graphs the file lacks (the code changed since). Either way
    what the caches served is logged (cache_counts_line); a failed write is a warning."""
    if loaded:
        log(f"compile_cache:kept path:{path} bytes:{Path(path).stat().st_size} {cache_counts_line()}")
        counts = compile_cache_counts()
        if counts["fxgraph_misses"] or counts["aot_misses"]:  # every start on a fresh machine compiles them again
            log(f"warning:compile_cache_incomplete path:{path} this run compiled graphs the file lacks (its misses "
                "above): delete the file and the next run writes one with them")
        return
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        log(f"compile_cache:nothing_compiled path:{path} {cache_counts_line()}")
        return
    try:
        write_atomic(Path(path), saved[0])
    except UserError as e:
        log(f"warning:compile_cache_not_written {e}")
        return
    log(f"compile_cache:saved path:{path} bytes:{len(saved[0])} {cache_counts_line()}")


# -----------------------------------------------------------------------------------------
# Evaluation: sliding windows, score-first TTT and SLOT
# Target t (t = 1..N-1 of the val stream) is scored exactly once, by the first window whose last
# target e_k = min(L + k*stride, N-1) reaches it; it sees the L tokens before e_k, so at least
# L - stride tokens of context. TTT scores before it trains. Words: a window is one pass's inputs; a
# chunk (of a phase) is the stream between two global TTT updates (without TTT: between two readings
# of its pace); a document's chunk is the targets it scores between two steps of its LoRA adapter.
# Per-document LoRA TTT (the default, TTT_LORA_RANK > 0) splits the stream into documents at BOS and
# groups them by where they start into global chunks of TTT_LORA_PHASE_TOKENS per GPU: each document
# is scored in growing chunks, its own adapter row stepping on each once it is scored, and after a
# global chunk the base model takes one SGD step on its documents. Windowed TTT (TTT_LORA_RANK=0):
# chunk c holds the windows whose first scored target lies in (c, c+1] * TTT_CHUNK_TOKENS, scored
# (inference mode) before the model trains on it (a window may score past its chunk: the next update
# trains on those targets). A phase's pace, timed from the end of its first chunk (compile, warm-up),
# projects its length: past the time left in EVAL_BUDGET_SECONDS, TTT stops adapting and a reference
# phase is abandoned. The n-gram tilt (NGRAM_TILT) reshapes the scored distribution at t with a hint
# from val tokens before t only; it never moves TTT's gradients.
# -----------------------------------------------------------------------------------------

def autocast_ctx(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class TokenScores:
    """Per-target NLL (nats) and bytes in val order (index t-1 for target t), and how often each was scored."""
    nll: torch.Tensor     # float64 [N-1]
    nbytes: torch.Tensor  # int32 [N-1]
    count: torch.Tensor   # int32 [N-1]

    @classmethod
    def zeros(cls, n: int, device: torch.device) -> TokenScores:
        return cls(torch.zeros(n, dtype=torch.float64, device=device), torch.zeros(n, dtype=torch.int32, device=device),
                   torch.zeros(n, dtype=torch.int32, device=device))

    def add(self, targets: torch.Tensor, nll: torch.Tensor, mask: torch.Tensor):
        """Count one more scoring of each target (stream positions t >= 1) where mask holds, with its NLL. The
        rest add nothing where they point (clamped into the stream): no boolean indexing, which waits for the GPU."""
        at, mask = (targets.reshape(-1) - 1).clamp(0, len(self.nll) - 1), mask.reshape(-1)
        self.nll.index_add_(0, at, torch.where(mask, nll.reshape(-1).double(), 0.0))
        self.count.index_add_(0, at, mask.int())

    def totals(self) -> tuple[float, float]:
        if not bool((self.count == 1).all()):
            raise RuntimeError(f"scoring bug: {int((self.count != 1).sum())} targets not scored exactly once")
        nll = self.nll.sum().item()
        return nll / len(self.nll), nll / (math.log(2) * self.nbytes.sum().item())


@dataclasses.dataclass(frozen=True)
class Phase:
    """One scoring pass over the val tokens: windows of seq_len, each scoring its last `stride` targets, or
    (lora) whole documents in chunks, with up to seq_len tokens of context each (stride unused)."""
    name: str
    seq_len: int
    stride: int
    ttt: bool = False         # score-first test-time training, chunk by chunk
    slot: str = "off"         # SLOT mode (see the SLOT knob)
    reference: bool = False   # not the score: a comparison, run only in the time left
    tilt: bool = False        # token-only n-gram tilt of the scored NLL (NGRAM_* knobs)
    lora: bool = False        # score whole documents, adapting each with its LoRA row while TTT adapts (TTT_LORA_*)
    looped: bool = True       # the layer order scored: training's checks before the loop turns on score the plain one

    @property
    def legal(self) -> bool:
        return self.slot != "full"


PACE_CHUNKS = 8  # an abandonable phase without TTT is walked in this many chunks, to measure its pace


def plan_phases(hp: Hyperparameters, train_seq_len: int) -> list[Phase]:
    """roundtrip (plain windows) -> sliding or TTT -> SLOT -> the sliding reference when TTT scores.
    The score is the last legal phase that is not a reference."""
    stride, tilt = hp.eval_stride or hp.eval_seq_len, hp.ngram_tilt  # the plain roundtrip is never tilted
    phases = [Phase("roundtrip", train_seq_len, train_seq_len)]
    if hp.eval_stride and not hp.ttt_enabled:
        phases.append(Phase("sliding", hp.eval_seq_len, stride, tilt=tilt))
    if hp.ttt_enabled:
        phases.append(Phase("ttt", hp.eval_seq_len, stride, ttt=True, tilt=tilt, lora=hp.ttt_lora_rank > 0))
    if hp.slot != "off":
        phases.append(Phase(f"slot_{hp.slot}", hp.eval_seq_len, stride, ttt=hp.ttt_enabled, slot=hp.slot, tilt=tilt))
    if hp.eval_stride and hp.ttt_enabled and hp.eval_sliding is not False:
        phases.append(Phase("sliding", hp.eval_seq_len, stride, reference=True, tilt=tilt))
    return phases


def window_ends(n_tokens: int, seq_len: int, stride: int) -> np.ndarray:
    """Last target of every sliding window (see above)."""
    last = n_tokens - 1
    L = min(seq_len, last)
    k = max(0, -(-(last - L) // stride))
    return np.minimum(L + stride * np.arange(k + 1), last)


def ttt_chunks(prev_ends: np.ndarray, chunk_tokens: int, n: int) -> list[tuple[np.ndarray, int, int]]:
    """Windowed TTT's chunks (see above), each as (window indices, lo, hi): the chunk holds the targets
    lo+1..hi, which its update trains on."""
    chunk_of = prev_ends // chunk_tokens
    return [(np.nonzero(chunk_of == c)[0], c * chunk_tokens, min((c + 1) * chunk_tokens, n))
            for c in range(int(chunk_of[-1]) + 1)]


def pace_chunks(n_windows: int, k: int) -> list[tuple[np.ndarray, int, int]]:
    """A phase without TTT: its windows in k chunks (no update after them: lo = hi = 0), for its pace."""
    return [(w, 0, 0) for w in np.array_split(np.arange(n_windows), min(k, n_windows))]


def doc_spans(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the stream's documents: one starts at each BOS (and at position 0) and holds
    the targets start+1..end, end being the next document's BOS or the last token, so that every
    target belongs to exactly one document."""
    starts = np.flatnonzero(tokens[:-1] == BOS_ID)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate(([0], starts))
    return starts, np.append(starts[1:], len(tokens) - 1)


def doc_chunks(starts: np.ndarray, ends: np.ndarray, chunk_tokens: int) -> list[tuple[np.ndarray, int, int]]:
    """LoRA TTT's global chunks: documents grouped by where they start (chunk_tokens apart), as (document
    indices, lo, hi): the global chunk holds the targets lo+1..hi, its documents' targets."""
    chunk_of = starts // chunk_tokens
    groups = [np.flatnonzero(chunk_of == c) for c in np.unique(chunk_of)]
    return [(d, int(starts[d[0]]), int(ends[d[-1]])) for d in groups]


def global_chunk_tokens(hp: Hyperparameters, world_size: int) -> int:
    """The stream's tokens between two global TTT updates of LoRA TTT: each rank's TTT_LORA_PHASE_TOKENS. A
    rank's LoRA steps per global chunk depend on its longest documents, not on its token count, so the global
    chunk grows with the ranks to keep their number."""
    return hp.ttt_lora_phase_tokens * world_size


def window_share(items: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """A rank's part of a chunk's windows: contiguous, equal counts to within one."""
    return items[len(items) * rank // world_size:len(items) * (rank + 1) // world_size]


def doc_share(items: np.ndarray, lengths: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """A rank's part of a chunk's documents, dealt longest first in snake order (ranks 0..W-1, then W-1..0,
    ...), so that every rank gets alike lengths and so alike LoRA work (the chunk waits for its busiest rank);
    in stream order."""
    lap = np.arange(len(items)) % (2 * world_size)
    dealt = np.minimum(lap, 2 * world_size - 1 - lap)  # the rank that the i-th longest document goes to
    return np.sort(items[np.argsort(-lengths, kind="stable")[dealt == rank]])


def budget_action(phase: Phase, hp: Hyperparameters) -> str | None:
    """What a phase does when its pace projects past the time left: stop adapting, be abandoned, or run on."""
    if phase.ttt and hp.ttt_budget_stop:
        return "stop_adapting"
    if phase.reference and hp.eval_sliding == AUTO:
        return "abandon"
    return None


def projected_seconds(elapsed: float, since_chunk0: float, c: int, n_chunks: int) -> float:
    """A phase's length projected after chunk c >= 1: the chunks left at their mean pace since chunk 0."""
    return elapsed + since_chunk0 / c * (n_chunks - 1 - c)


class Pace:
    """Projects a phase's length after each chunk; all ranks take the slowest's, so they act at one chunk."""

    def __init__(self, dctx: Dist, n_clock: int):
        self.dctx, self.n_clock, self.t0, self.t_first = dctx, n_clock, time.perf_counter(), None

    def projected(self, clock: int) -> float | None:
        """After the chunk at `clock` of n_clock (its place in the stream: LoRA TTT's global chunks that hold
        no document start are skipped, not run)."""
        synchronize(self.dctx.device)
        now = time.perf_counter()
        if clock == 0:
            self.t_first = now  # chunk 0 carries the warm-up: the pace is timed from its end
            return None
        return self.dctx.all_reduce_max(projected_seconds(now - self.t0, now - self.t_first, clock, self.n_clock))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def even_batches(items: np.ndarray, size: int) -> list[np.ndarray]:
    """Batches of at most `size`, as equal as possible: a remainder batch of one window would cost a
    recompile (torch.compile specializes dims of size 1, dynamic or not)."""
    return np.array_split(items, -(-len(items) // size)) if len(items) else []


def eval_compiles(hp: Hyperparameters, device: torch.device) -> bool:
    return hp.eval_compile is True or (hp.eval_compile == AUTO and compile_applies(hp, device))


def eval_forward(model: GPT, hp: Hyperparameters, device: torch.device, looped: bool):
    """The model's hidden states in the layer order given (per-document adapted with a LoRA), compiled per
    EVAL_COMPILE with the batch and length dims dynamic: one graph without the LoRA (windows of every phase,
    and documents once the budget stopped the adapting; the weights frozen in both), one with the LoRA and
    grad, and one with the LoRA without grad (every scoring pass that no update backpropagates through: a
    batch's last step, and all of them where the updates have passes of their own, TTT_LORA_GRAD_CONTEXT)."""
    def hidden(x, lora=None):
        return model.hidden(x, looped=looped, lora=lora)
    if not eval_compiles(hp, device):
        return hidden
    configure_inductor()  # as training compiles: an EVAL_ONLY run builds the kernels that a training run's eval does
    compiled = torch.compile(hidden, fullgraph=True)

    def dynamic_hidden(x, lora=None):
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(x, 1)
        return compiled(x, lora)
    return dynamic_hidden


def eval_tokens(model: GPT, val: ValSet, dctx: Dist, hp: Hyperparameters, phase: Phase, log=silent,
                time_left: float | None = None) -> TokenScores | None:
    """Score every val target once in `phase` (the legal loop: score chunk c, then maybe adapt on
    it). Windows (contiguous) or documents (dealt by length) are split across ranks within each chunk.
    With time_left (seconds), the phase's budget_action applies; None when a reference phase was
    abandoned. Returns all ranks' scores."""
    tokens = torch.from_numpy(val.tokens.astype(np.int64)).to(dctx.device)
    n = len(val.tokens) - 1
    out = TokenScores.zeros(n, dctx.device)
    action = budget_action(phase, hp) if time_left is not None else None
    hidden = eval_forward(model, hp, dctx.device, phase.looped)
    if phase.lora:
        starts, ends = doc_spans(val.tokens)
        C = global_chunk_tokens(hp, dctx.world_size)
        chunks = doc_chunks(starts, ends, C)
        # The schedule's clock is where the chunk starts in the stream, not its place in the list: how many
        # global chunks hold a document start is decided by later BOS, which no update before them may read.
        clock, n_clock = [lo // C for _, lo, _ in chunks], (n - 1) // C + 1
        lora = LoRA(model.cfg, hp.ttt_lora_docs, hp.ttt_lora_rank, dctx.device, lora_targets(hp))
        log(f"ttt_lora rank:{hp.ttt_lora_rank} targets:{','.join(lora_targets(hp))} lr:{hp.ttt_lora_lr} "
            f"chunk:{int(chunk_size(0, hp, True, phase.seq_len))} steps:{hp.ttt_lora_steps} "
            f"batch_docs:{hp.ttt_lora_docs} docs:{len(starts)} "
            f"global_chunks:{len(chunks)} global_chunk_tokens:{C}")

        def score_chunk(items: np.ndarray, hints: torch.Tensor | None, adapting: bool):
            mine = doc_share(items, ends[items] - starts[items], dctx.rank, dctx.world_size)
            score_docs(model, hidden, tokens, starts[mine], ends[mine], phase, out, hp, hints,
                       lora if adapting else None)
    else:
        ends = window_ends(len(val.tokens), phase.seq_len, phase.stride)
        prev = np.concatenate(([0], ends[:-1]))
        chunks = ttt_chunks(prev, hp.ttt_chunk_tokens, n) if phase.ttt else \
            pace_chunks(len(ends), PACE_CHUNKS if action == "abandon" else 1)
        clock, n_clock = list(range(len(chunks))), len(chunks)  # windowed chunks run evenly: chunk c at clock c

        def score_chunk(items: np.ndarray, hints: torch.Tensor | None, adapting: bool):  # adapts in updates only
            for w in even_batches(window_share(items, dctx.rank, dctx.world_size), hp.eval_batch_seqs):
                score_windows(model, hidden, tokens, ends[w], prev[w], phase, out, hp, hints)
    adapting = phase.ttt  # until the budget stops it
    updater = TTTUpdater(model, hp, dctx, phase.looped) if adapting else None
    pace = Pace(dctx, n_clock)
    graphs0 = compiled_graph_count()  # each chunk's line counts the graphs compiled since: time that was not scoring
    hints = phase_hints(tokens, phase, hp, log)  # inside the phase's clock: it is part of the evaluation
    for c, (items, lo, hi) in enumerate(chunks):
        with frozen(model):  # scoring trains no weight (and the graph guards requires_grad: one for both kinds)
            score_chunk(items, hints, adapting)
        if c + 1 == len(chunks) or (not adapting and action != "abandon"):
            continue
        projected = pace.projected(clock[c]) if action else None
        if projected is not None and projected > time_left:
            log(f"{phase.name}:{'abandoned' if action == 'abandon' else 'updates_stopped'} after_chunk:{c + 1}/"
                f"{len(chunks)} elapsed:{pace.elapsed():.1f}s projected:{projected:.0f}s time_left:{time_left:.0f}s")
            if action == "abandon":
                return None
            adapting, updater, action = False, None, None  # its optimizer state is freed
            continue
        if adapting:
            updater.update(tokens, lo, hi, clock[c], n_clock, out.count)
            if phase.lora or (c + 1) % 10 == 0:
                log(f"ttt_chunk:{c + 1}/{len(chunks)} time:{pace.elapsed():.1f}s "
                    f"new_graphs:{compiled_graph_count() - graphs0}")
    for t in (out.nll, out.count):
        dctx.all_reduce_sum(t)
    out.nbytes = out.count * torch.from_numpy(val.target_bytes).to(dctx.device)  # a target's bytes, each time scored
    return out


def on_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on the device without draining its queue: a copy from pageable memory waits for all
    work queued before it, one from pinned memory (non_blocking) is queued behind it."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def score_windows(model: GPT, hidden, tokens: torch.Tensor, ends: np.ndarray, prev_ends: np.ndarray, phase: Phase,
                  out: TokenScores, hp: Hyperparameters, hints: torch.Tensor | None = None):
    """Score a batch of windows into `out`, running `hidden` (eval_forward's) for the hidden states.
    A window's scored targets are its last ends-prev_ends, so the head and loss run on the batch's
    longest such tail only. With SLOT, a per-window delta on the final hidden states is fitted
    first: on the window's context targets (scored by earlier windows) or, for `full`, on the very
    targets being scored (which leaks them). With hints (phase_hints'), the NLL is the
    n-gram tilt's."""
    L = min(phase.seq_len, int(ends[0]))
    n_scored = ends - prev_ends  # each window scores its last n_scored positions
    starts, first_scored = on_device(np.stack((ends - L, L - n_scored)), tokens.device)
    idx = starts[:, None] + torch.arange(L + 1, device=tokens.device)
    win = tokens[idx]
    # x as chunk_nll's: contiguous, made outside inference mode (the graph guards strides and tensor kind)
    x, y = win[:, :-1].contiguous(), win[:, 1:]
    scored = torch.arange(L, device=tokens.device)[None, :] >= first_scored[:, None]
    with torch.inference_mode(), autocast_ctx(tokens.device):
        h = hidden(x)
    if phase.slot != "off":
        h = fit_slot_delta(model, h.clone(), y, scored if phase.slot == "full" else ~scored, hp)
    cut = L - int(n_scored.max())
    x, y, h, scored = x[:, cut:], y[:, cut:], h[:, cut:], scored[:, cut:]
    pos = starts[:, None] + 1 + cut + torch.arange(L - cut, device=tokens.device)[None, :]  # stream position of y
    head_ctx = autocast_ctx(tokens.device) if phase.slot == "off" else contextlib.nullcontext()  # SLOT: as fitted
    with torch.inference_mode(), head_ctx:
        nll = model.nll_from_hidden(h, y) if hints is None else \
            tilted_scores(model, h, y, hints[pos], hp.ngram_beta, hp.ngram_gamma)
    out.add(pos, nll, scored)


def doc_batches(starts: np.ndarray, ends: np.ndarray, size: int, align: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Documents in batches of at most `size`, longest first (a batch's documents take similar steps), as their
    (starts, ends), padded after them with rows without targets (start = end) to aligned_rows: a lone
    document gets one beside it, as a batch of one would compile graphs of its own."""
    batches = [(starts[b], ends[b]) for b in even_batches(np.argsort(starts - ends, kind="stable"), size)]
    pad = [np.full(aligned_rows(len(s), size, align) - len(s), s[0]) for s, _ in batches]
    return [(np.append(s, p), np.append(e, p)) for (s, e), p in zip(batches, pad)]


def aligned_rows(n: int, cap: int, align: int) -> int:
    """Rows to run for n of them: a multiple of `align` (TTT_LORA_ROW_ALIGN) where `cap` allows, never fewer
    than n nor than two."""
    return max(min(-(-n // align) * align, cap), n, 2)


def chunk_size(done, hp: Hyperparameters, adapting: bool, seq_len: int) -> np.ndarray:
    """The size of the chunk after `done` scored targets (chunk_bounds' rule), before a document's end cuts it:
    grown past TTT_LORA_STEPS chunks, never past half a window (where TTT_LORA_CHUNK's default would, the
    window is short: TTT_LORA_CHUNK set above it is refused)."""
    done, cap = np.asarray(done), seq_len // 2
    if not adapting:
        return np.full_like(done, cap)
    return np.minimum(np.maximum(hp.ttt_lora_chunk, -(-done // hp.ttt_lora_steps)), cap)


def chunk_bounds(n: int, hp: Hyperparameters, adapting: bool, seq_len: int) -> np.ndarray:
    """Offsets 0 = o_0 < ... < o_k = n of a document's scoring steps (step j scores targets o_j + 1 .. o_(j+1)).
    A chunk is TTT_LORA_CHUNK targets, or 1/TTT_LORA_STEPS of what the document has scored if that is more,
    at most half a window (each target keeps half a window of context): its size follows from the document's
    past only, not from its length, which a score must not know. Nothing adapting: half-window chunks."""
    out = [0]
    while out[-1] < n:
        out.append(min(n, out[-1] + chunk_size(out[-1], hp, adapting, seq_len)))
    return np.array(out)


def doc_steps(s: np.ndarray, e: np.ndarray, hp: Hyperparameters, adapting: bool,
              seq_len: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The scoring steps of a batch of documents (targets s+1..e each), as (begin, prev, last) per row: step
    j scores targets prev+1..last from inputs begin..last-1. Chunks follow chunk_bounds; a finished row
    scores nothing (targets s+2..s+1). chunk_bounds is one offset sequence that each document cuts at its own
    length, so a step's live rows stand at the same offsets (prev-s, begin-s) and differ only in a last chunk
    cut short: the live rows are a prefix (step_rows), and grad_window's choice is one for all of them."""
    bounds = [chunk_bounds(int(n), hp, adapting, seq_len) for n in e - s]
    n_steps = np.array([len(b) - 1 for b in bounds])
    offsets = np.stack([np.pad(b, (0, n_steps.max() + 1 - len(b)), mode="edge") for b in bounds])
    steps = []
    for j in range(int(n_steps.max())):
        live = n_steps > j
        prev = np.where(live, s + offsets[:, j], s + 1)
        last = np.where(live, s + offsets[:, j + 1], s + 1)
        # The window reaches back from where the chunk would end uncut: where the document ends (a later
        # token) must not decide how much context its last chunk sees.
        reach = prev + chunk_size(offsets[:, j], hp, adapting, seq_len)
        steps.append((np.where(live, np.maximum(s, reach - seq_len), s), prev, last))
    return steps


def step_rows(prev: np.ndarray, last: np.ndarray, align: int) -> int:
    """How many rows of a doc_steps step run: those that still score, a prefix since a batch's documents
    come longest first (doc_batches) and a longer document never takes fewer steps (chunk_bounds), padded
    with finished rows (scoring nothing) to aligned_rows within the batch."""
    n = int((last > prev).sum())
    if not (last[:n] > prev[:n]).all():
        raise RuntimeError("scoring bug: a LoRA batch's documents must come longest first")
    return aligned_rows(n, len(prev), align)


def grad_window(begin: np.ndarray, prev: np.ndarray, hp: Hyperparameters) -> np.ndarray | None:
    """Where the inputs of an adapter step's own pass start: TTT_LORA_GRAD_CONTEXT tokens before each chunk, at
    most the scoring window's; None where no row would lose context (knob 0, or short contexts so far): then
    the scoring pass is the step's."""
    ctx = hp.ttt_lora_grad_context
    start = np.maximum(begin, prev - ctx)
    return start if ctx and (start > begin).any() else None


class Step(NamedTuple):
    """One scoring step of a LoRA batch (step_plan): the running rows' inputs begin..last-1 and targets
    prev+1..last, whether an adapter update follows, and where that update's own pass starts (None: the
    scoring pass is the update's, or there is no update)."""
    begin: np.ndarray
    prev: np.ndarray
    last: np.ndarray
    stepping: bool
    grad_begin: np.ndarray | None

    @property
    def scores_with_grad(self) -> bool:
        """The scoring pass keeps its graph: the update backpropagates through it."""
        return self.stepping and self.grad_begin is None


def step_plan(s: np.ndarray, e: np.ndarray, hp: Hyperparameters, adapting: bool, seq_len: int):
    """doc_steps' steps as score_docs runs them, as Steps: the running rows only (step_rows), an update after
    every step but the last when adapting, with its own pass where grad_window says so."""
    steps = doc_steps(s, e, hp, adapting, seq_len)
    for j, (begin, prev, last) in enumerate(steps):
        n = step_rows(prev, last, hp.ttt_lora_row_align)
        begin, prev, last = begin[:n], prev[:n], last[:n]
        stepping = adapting and j + 1 < len(steps)
        yield Step(begin, prev, last, stepping, grad_window(begin, prev, hp) if stepping else None)


WINDOW_ALIGN = 64  # a step's padded window length is a multiple of this (the compiled graph is dynamic in it)


def window_len(begin: np.ndarray, last: np.ndarray, seq_len: int) -> int:
    """The padded input length of a step of doc_steps: its longest window rounded up to WINDOW_ALIGN, at
    most seq_len. eval_forward's graph takes any length: a coarser rounding (powers of two) only pads more
    tokens through the forward and backward."""
    return min(-(-int((last - begin).max()) // WINDOW_ALIGN) * WINDOW_ALIGN, seq_len)


def chunk_nll(model: GPT, hidden, tokens: torch.Tensor, begin: np.ndarray, prev: np.ndarray, last: np.ndarray,
              seq_len: int, lora: LoRA | None, grad: bool):
    """The plain NLL [rows, M] of targets prev+1..last of each row from the window of inputs begin..last-1
    (inside the row's document, right-padded with zeros to window_len, which causal attention never lets
    back), with the mask of real targets, their final hidden states, ids and stream positions. The head
    runs on those positions only (the window's tail)."""
    dev = tokens.device
    L = window_len(begin, last, seq_len)
    first, end, n_scored, skip = on_device(np.stack((begin, last, last - prev, prev - begin)), dev)
    pos = first[:, None] + 1 + torch.arange(L, device=dev)  # stream position of y
    valid = pos <= end[:, None]
    inside = pos.clamp(max=len(tokens) - 1)  # the padding's positions may run past the stream
    x = torch.where(valid, tokens[inside - 1], 0)
    k = torch.arange(int((last - prev).max()), device=dev)  # sized on the host: no wait for the GPU
    tail = (skip[:, None] + k).clamp(max=L - 1)  # row r's targets
    scored = k < n_scored[:, None]
    pos = pos.gather(1, tail).clamp(max=len(tokens) - 1)  # unscored tail entries may point past the stream
    y = torch.where(scored, tokens[pos], 0)  # only real targets are read
    with torch.enable_grad() if grad else torch.inference_mode(), autocast_ctx(dev):
        h = hidden(x, lora)
        h = h.gather(1, tail[..., None].expand(-1, -1, h.size(-1)))
        nll = model.nll_from_hidden(h, y, lora=lora)
    return nll, scored, h, y, pos


def score_doc_chunk(model: GPT, hidden, tokens: torch.Tensor, begin: np.ndarray, prev: np.ndarray, last: np.ndarray,
                    phase: Phase, out: TokenScores, hp: Hyperparameters, hints: torch.Tensor | None,
                    lora: LoRA | None, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Score targets prev+1..last of each row into `out` from the window begin..last-1 (chunk_nll, at most
    seq_len); returns their plain NLL (with grad if asked) and the mask of real ones."""
    nll, scored, h, y, pos = chunk_nll(model, hidden, tokens, begin, prev, last, phase.seq_len, lora, grad)
    with torch.no_grad(), autocast_ctx(tokens.device):
        score = nll.detach() if hints is None else \
            tilted_scores(model, h.detach(), y, hints[pos], hp.ngram_beta, hp.ngram_gamma, lora)
    out.add(pos, score, scored)
    return nll, scored


# AdamW of the per-document adapters as the record of parameter-golf PR #1855 tuned it: no momentum (beta1 0:
# a zero gradient moves a row by its decay alone), beta2 0.99, decay 0.5.
LORA_BETAS, LORA_EPS, LORA_WD = (0.0, 0.99), 1e-10, 0.5


class RowAdamW:
    """AdamW of the adapters' first n rows, fused (one pass over each weight, gradient and moments): a batch's
    live rows are its first ones (score_docs), so rows past a step's n are neither read nor written (the rows
    that pad a step to n are finished documents': decayed, never scoring again). score_docs builds one per call
    (its moments as large as the adapters) and resets it with each batch."""

    def __init__(self, params: list[torch.Tensor], lr: float):
        self.params, self.lr = params, lr
        self.m, self.v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        # one count per weight: the fused step advances each count it is given
        self.counts = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]
        self.views = {}  # n -> the first n rows of weights and moments: made once (host time, every step)

    @torch.no_grad()
    def reset(self):
        for t in self.m + self.v + self.counts:
            t.zero_()

    @torch.no_grad()
    def step(self, grads: tuple[torch.Tensor, ...], n: int):
        """One step of rows 0..n-1 with these full-batch gradients. The fused kernel reads a gradient as if laid
        out like its weight: a transposed one (autograd.grad keeps the layout its backward made) is copied so."""
        if n not in self.views:
            self.views[n] = [[t[:n] for t in ts] for ts in (self.params, self.m, self.v)]
        params, m, v = self.views[n]
        adamw(params, [g[:n].contiguous() for g in grads], m, v, [], self.counts, fused=True, amsgrad=False,
              beta1=LORA_BETAS[0], beta2=LORA_BETAS[1], lr=self.lr, weight_decay=LORA_WD, eps=LORA_EPS, maximize=False)


@contextlib.contextmanager
def frozen(model: GPT):
    """The model's own weights need no gradient while only the adapters train."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def score_docs(model: GPT, hidden, tokens: torch.Tensor, starts: np.ndarray, ends: np.ndarray, phase: Phase,
               out: TokenScores, hp: Hyperparameters, hints: torch.Tensor | None, lora: LoRA | None):
    """Score whole documents (targets start+1..end each) into `out`, longest first, TTT_LORA_DOCS side by
    side. Each document is walked in chunks (chunk_bounds): a chunk is scored with up to seq_len tokens
    of its own document before it, then every document's adapter (row of `lora`) takes one AdamW step on
    the mean NLL of its chunk, whose targets are all scored now (read with less context where
    TTT_LORA_GRAD_CONTEXT says so: grad_window). A finished document leaves the batch (step_rows): the
    longest documents come first and take the most steps, so the live rows are always the batch's first
    ones, row i keeps adapter row i and only live rows step (RowAdamW). Without lora (TTT stopped by the
    budget) nothing trains."""
    opt = RowAdamW(list(lora.parameters()), hp.ttt_lora_lr) if lora is not None else None
    for s, e in doc_batches(starts, ends, hp.ttt_lora_docs, hp.ttt_lora_row_align):
        if lora is not None:
            lora.reset()
            opt.reset()
        for step in step_plan(s, e, hp, lora is not None, phase.seq_len):
            begin, prev, last, stepping, grad_begin = step
            nll, scored = score_doc_chunk(model, hidden, tokens, begin, prev, last, phase, out, hp, hints, lora,
                                          grad=step.scores_with_grad)
            if grad_begin is not None:  # the step reads less context than the score: a pass of its own
                nll, scored = chunk_nll(model, hidden, tokens, grad_begin, prev, last, phase.seq_len, lora, True)[:2]
            if stepping:
                loss = ((nll * scored).sum(1) / scored.sum(1).clamp(min=1)).sum()  # per document: rows independent
                opt.step(torch.autograd.grad(loss, opt.params), len(prev))


# Token-only n-gram tilt. The hint at position t is the continuation seen most often after the same
# NGRAM_ORDER-1 tokens earlier in the stream, kept when its share of that context's continuations
# reaches NGRAM_THRESHOLD. The scored distribution becomes p'(a) = p(a) e^(beta [a = hint]) / Z,
# Z = 1 - p(hint) + p(hint) e^beta: normalized exactly over the vocabulary, fixed before target t is
# read. Hint and gate read tokens < t only: a gate on the target itself (say, whether it starts a
# word) would leak it unseen by the future-perturbation check, so tests check causality directly.

NGRAM_HASH_SEED = 20240501  # fixed, so that the hints are a function of the tokens alone


def context_hashes(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """A 64-bit hash of tokens[t-k:t] for t = k..N-1: sum of (token + 1) times a random odd multiplier per
    offset (int64 wraps). A rare collision only merges two contexts' counts, still of earlier tokens."""
    n = len(tokens)
    mult = np.random.default_rng(NGRAM_HASH_SEED).integers(1, 2**61, size=k) * 2 + 1
    shifted = tokens.long() + 1  # so that token 0 still moves the hash
    h = torch.zeros(n - k, dtype=torch.int64, device=tokens.device)
    for j in range(1, k + 1):
        h += shifted[k - j:n - j] * int(mult[j - 1])
    return h


def first_of_runs(sorted_keys: torch.Tensor) -> torch.Tensor:
    """True where a run of equal keys starts."""
    return torch.cat((torch.ones(1, dtype=torch.bool, device=sorted_keys.device), sorted_keys[1:] != sorted_keys[:-1]))


def run_starts(first: torch.Tensor) -> torch.Tensor:
    """The index where each element's run starts (`first` marks run starts)."""
    i = torch.arange(len(first), device=first.device)
    return torch.where(first, i, 0).cummax(0).values


def running_count(keys: torch.Tensor) -> torch.Tensor:
    """For each element, how many elements up to and including it carry its key."""
    sorted_keys, order = torch.sort(keys, stable=True)  # stable: equal keys keep their order
    count = torch.empty_like(keys)
    count[order] = torch.arange(len(keys), device=keys.device) - run_starts(first_of_runs(sorted_keys)) + 1
    return count


def ngram_hints(tokens: torch.Tensor, order: int, threshold: float) -> torch.Tensor:
    """hints[t]: the tilt's token at position t, -1 for none. Equal to a left-to-right pass that looks up
    the context tokens[t-order+1:t] among the counts of positions before t, proposes its most frequent
    continuation (the first to reach the top count) if that has `threshold` of the total, and only then
    counts tokens[t]; done with two stable sorts over the whole stream, no loop over positions."""
    n, k = len(tokens), order - 1
    hints = torch.full((n,), -1, dtype=torch.int64, device=tokens.device)
    if n <= k:
        return hints
    ctx, by_ctx = torch.sort(context_hashes(tokens, k), stable=True)  # each context's occurrences in stream order
    nxt = tokens[k:].long()[by_ctx]  # the continuation at each occurrence
    first = first_of_runs(ctx)
    group = first.long().cumsum(0) - 1  # dense context id
    i = torch.arange(n - k, device=tokens.device)
    seen = i - run_starts(first)  # the context's continuations before this occurrence
    count = running_count(group * (int(nxt.max()) + 1) + nxt)  # this continuation's count, this occurrence included
    # The top count before each occurrence: the running max of count within its context, one step
    # behind. Adding group * (n + 1) keeps each context's values above all earlier contexts', so one
    # cumulative max over the whole array never carries a value across contexts.
    offset = group * (n + 1)
    top_before = torch.where(first, 0, ((count + offset).cummax(0).values - offset).roll(1))
    # The most frequent continuation is the last one to raise the top count (ties keep the earlier).
    last_raise = torch.where(count > top_before, i, -1).cummax(0).values
    best_before = nxt[last_raise.roll(1)]
    hinted = ~first & (top_before >= threshold * seen)
    hints[k + by_ctx[hinted]] = best_before[hinted]
    return hints


def backoff_hints(tokens: torch.Tensor, orders: tuple[int, ...], threshold: float) -> torch.Tensor:
    """The first order's hint where it has one, else the next order's, and so on (each reads tokens < t only)."""
    hints = ngram_hints(tokens, orders[0], threshold)
    for order in orders[1:]:
        hints = torch.where(hints >= 0, hints, ngram_hints(tokens, order, threshold))
    return hints


def tilted_nll(nll: torch.Tensor, hint_nll: torch.Tensor, hit: torch.Tensor, beta: float,
               gamma: float) -> torch.Tensor:
    """-log p'(y) from -log p(y), -log p(hint) and [y = hint]; log Z = log1p(p(hint) (e^b - 1)) with the boost
    b = beta (1 - p(hint))^gamma: a function of the context alone, so the tilt stays exactly normalized."""
    b = beta * (-torch.expm1(-hint_nll)).pow(gamma)  # 1 - p(hint), accurate where p(hint) is near 1
    return nll - b * hit.to(nll.dtype) + torch.log1p(torch.exp(-hint_nll) * torch.expm1(b))


def tilted_scores(model: GPT, h: torch.Tensor, y: torch.Tensor, hint: torch.Tensor, beta: float, gamma: float,
                  lora: LoRA | None = None) -> torch.Tensor:
    """The tilted NLL of targets y where a hint (>= 0) is given, the model's own NLL elsewhere. p(y) and
    p(hint) come from one head pass, each as nll_from_hidden computes it."""
    nll = model.nll_of_ids(h, torch.stack((y, hint.clamp_min(0)), dim=-1), lora)
    return torch.where(hint >= 0, tilted_nll(nll[..., 0], nll[..., 1], y == hint, beta, gamma), nll[..., 0])


def phase_hints(tokens: torch.Tensor, phase: Phase, hp: Hyperparameters, log=silent) -> torch.Tensor | None:
    """The phase's n-gram hints (None when it is not tilted); logs how many targets get one and the time."""
    if not phase.tilt:
        return None
    t0 = time.perf_counter()
    hints = backoff_hints(tokens, ngram_orders(hp), hp.ngram_threshold)
    n_hinted, n = int((hints[1:] >= 0).sum()), len(tokens) - 1  # position 0 is no target
    log(f"ngram_tilt:{phase.name} ngram_order:{hp.ngram_order} ngram_threshold:{hp.ngram_threshold} "
        f"ngram_beta:{hp.ngram_beta} ngram_gamma:{hp.ngram_gamma} hinted:{n_hinted}/{n} "
        f"hinted_frac:{n_hinted / max(n, 1):.4f} precompute:{time.perf_counter() - t0:.2f}s")
    return hints


def fit_slot_delta(model: GPT, h: torch.Tensor, y: torch.Tensor, fit_mask: torch.Tensor, hp) -> torch.Tensor:
    delta = torch.zeros(h.size(0), 1, h.size(-1), device=h.device, requires_grad=True)
    opt = torch.optim.AdamW([delta], lr=hp.slot_lr, weight_decay=1e-8, eps=1e-5)
    weight = fit_mask.float() / fit_mask.sum(dim=1, keepdim=True).clamp_min(1)
    h = h.float()
    for _ in range(hp.slot_steps):
        with torch.enable_grad():  # the head in fp32: autocast would round h + delta to bf16, and the delta's steps with it
            loss = (model.nll_from_hidden(h + delta, y) * weight).sum()
        # Only delta's gradient: backward() would also fill the head's and the caps' .grad, unused.
        (delta.grad,) = torch.autograd.grad(loss, [delta])
        opt.step()
    return (h + delta).detach()


class TTTUpdater:
    """The update half of score-first TTT: SGD on a chunk whose targets were all scored already, in the layer
    order the phase scores (looped)."""

    def __init__(self, model: GPT, hp: Hyperparameters, dctx: Dist, looped: bool):
        self.model, self.hp, self.dctx, self.looped = model, hp, dctx, looped
        self.params = list(model.parameters())
        for p in self.params:
            p.grad = torch.zeros_like(p)
        caps = model.logit_caps
        groups = [dict(params=[p for p in self.params if p is not caps], base_lr=hp.ttt_lr)]
        if caps is not None:
            groups.append(dict(params=[caps], base_lr=hp.asym_logit_lr))
        self.opt = torch.optim.SGD(groups, lr=hp.ttt_lr, momentum=TTT_MOMENTUM)
        L = model.cfg.num_layers
        frozen_layers = list(range(min(hp.ttt_freeze_blocks, L)))
        self.frozen_rows = {getattr(model, b): bank_rows(b, frozen_layers, L) for b in BANKS}

    def update(self, tokens: torch.Tensor, lo: int, hi: int, clock: int, n_clock: int, count: torch.Tensor):
        """Train on targets lo+1..hi (inputs lo..hi-1), the chunk at `clock` of n_clock on the cosine; refuses
        unless all of them are scored."""
        done = count[lo:hi].clone()
        self.dctx.all_reduce_sum(done)  # every rank's scores of this chunk must be in
        if not bool((done >= 1).all()):
            raise RuntimeError(f"TTT legality: the chunk at clock position {clock} has unscored targets before its "
                               "update")
        hp, world, rank = self.hp, self.dctx.world_size, self.dctx.rank
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * 0.5 * (1 + math.cos(math.pi * clock / max(n_clock - 1, 1)))
        starts = list(range(lo, hi, hp.eval_seq_len))  # the last segment may hold one target (hi)
        for _ in range(hp.ttt_epochs):
            for b in range(0, len(starts), hp.ttt_batch_seqs):
                batch = starts[b:b + hp.ttt_batch_seqs]
                self._step(tokens, batch[len(batch) * rank // world:len(batch) * (rank + 1) // world], hi)

    def _step(self, tokens: torch.Tensor, starts: list[int], hi: int):
        """One SGD step on the mean NLL over the global batch (this rank holds `starts`)."""
        segs = [tokens[s:min(s + self.hp.eval_seq_len, hi) + 1] for s in starts]
        count = torch.tensor(float(sum(len(g) - 1 for g in segs)), device=tokens.device)
        self.dctx.all_reduce_sum(count)
        self.opt.zero_grad(set_to_none=False)
        for length in sorted({len(g) for g in segs}):
            batch = torch.stack([g for g in segs if len(g) == length])
            with autocast_ctx(tokens.device):
                (self.model(batch[:, :-1], batch[:, 1:], looped=self.looped).sum() / count).backward()
        self.dctx.all_reduce_flat_([p.grad for p in self.params])
        with torch.no_grad():
            for bank, rows in self.frozen_rows.items():
                bank.grad[rows] = 0
        if self.hp.ttt_grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.hp.ttt_grad_clip)
        self.opt.step()


def perturbation_points(tokens: np.ndarray, phase: Phase, hp: Hyperparameters, world_size: int) -> list[int]:
    """The positions p that the legality check perturbs after, one stream each (hp: the check's own knobs).
    A first target after an update catches an update that read two or more targets past what it had scored
    (one that read one reads target p itself, which no perturbation after p can show: the state tests do)."""
    return lora_points(tokens, phase, hp, world_size) if phase.lora else window_points(tokens, phase, hp)


def window_points(tokens: np.ndarray, phase: Phase, hp: Hyperparameters) -> list[int]:
    """Windows: near the middle, inside the stride a window scores; with TTT, also the first target after a
    chunk's update. From the windows' real ends: EVAL_SEQ_LEN need not be a multiple of the stride."""
    mid, ends = len(tokens) // 2, window_ends(len(tokens), phase.seq_len, phase.stride)
    prev = np.concatenate(([0], ends[:-1]))
    i = min(int(np.searchsorted(ends, mid)), len(ends) - 1)  # the window that scores target mid
    points = {int(prev[i] + max(1, (ends[i] - prev[i]) // 2))}  # with the window's next target after it
    first = np.flatnonzero(prev >= max(mid // hp.ttt_chunk_tokens, 1) * hp.ttt_chunk_tokens)
    after = int(prev[first[0]]) + 1 if len(first) else len(tokens)  # a chunk's first target
    return sorted(points | ({after} if phase.ttt and after < len(tokens) - 1 else set()))


def lora_points(tokens: np.ndarray, phase: Phase, hp: Hyperparameters, world_size: int) -> list[int]:
    """LoRA: the first target after a global update near the middle and, in the document nearest the middle
    with three chunks (else the one there), a chunk's middle (a score reading later targets of its own chunk
    changes), the first target after the document's second step and, with TTT_LORA_GRAD_CONTEXT, the first
    target after the first step that updates in a pass of its own; and a late chunk's middle in the longest
    document, where it is longer than the window."""
    mid, (starts, ends) = len(tokens) // 2, doc_spans(tokens)
    updated = [hi for _, _, hi in doc_chunks(starts, ends, global_chunk_tokens(hp, world_size))[:-1]]
    # the point p = hi + 1 whose next target is no BOS: the perturbation keeps a BOS, so p + 1 must be another token
    changeable = [hi for hi in updated if hi + 2 < len(tokens) and tokens[hi + 2] != BOS_ID] or updated
    points = {min(changeable, key=lambda hi: abs(hi - mid)) + 1} if updated else set()
    bounds = [s + chunk_bounds(e - s, hp, True, phase.seq_len) for s, e in zip(starts, ends)]
    movable = [np.minimum(b[1:], e - 1) - b[:-1] for b, e in zip(bounds, ends)]  # not the BOS at e
    usable = [bool((m[2:] >= 2).any()) for m in movable]  # a chunk after two steps that the check can straddle
    # the longest document's last chunk that starts a window or more into it: the window has slid there, which
    # the points of a document's first chunks below never reach
    longest = max(range(len(starts)), key=lambda i: int(ends[i] - starts[i]))
    lb, lm = bounds[longest], movable[longest]
    late = np.flatnonzero((lm >= 2) & (lb[:-1] - starts[longest] >= phase.seq_len))
    if len(late):
        points.add(int(lb[late[-1]] + lm[late[-1]] // 2))
    d = min(range(len(starts)), key=lambda i: (not usable[i], abs(int(starts[i]) - mid)))
    b, m = bounds[d], movable[d]
    ok = np.flatnonzero(m >= 2)
    if len(ok) == 0:  # a document too short to straddle: any position still checks causality
        return sorted(points | {mid})
    j = next((k for k in ok if k >= 2), ok[-1])  # as many steps before it as the document allows, up to two
    points |= {int(b[j] + m[j] // 2), int(b[j] + 1)}
    plan = step_plan(starts[[d]], ends[[d]], hp, True, phase.seq_len)
    own = [k for k, (*_, grad_begin) in enumerate(plan) if grad_begin is not None]
    if own and own[0] + 1 < len(m) and m[own[0] + 1] >= 2:
        points.add(int(b[own[0] + 1] + 1))
    return sorted(points)


# The legality check's attention: SDPA's math kernel is bitwise reproducible forward and backward on a GPU
# (cuDNN's backward is not: it accumulates in a run-dependent order).
reproducible_attention = pinned_attention(torch.nn.attention.SDPBackend.MATH)


@contextlib.contextmanager
def deterministic_kernels():
    """PyTorch's deterministic kernels where it has them (a warning where it has none)."""
    state = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(state[0], warn_only=state[1])


LEGALITY_CHUNK_TOKENS = 8192  # the check's largest TTT chunk: the legal loop is the same at any size


def check_knobs(hp: Hyperparameters, world_size: int) -> Hyperparameters:
    """The legality check's knobs: eager, TTT chunks of at most LEGALITY_CHUNK_TOKENS (both modes), so that
    an eager pass over its prefix is short and the prefix still holds several global updates."""
    stride = hp.eval_stride or hp.eval_seq_len
    return hp.replace(eval_compile=False,
                      ttt_chunk_tokens=min(hp.ttt_chunk_tokens, max(stride, LEGALITY_CHUNK_TOKENS // stride * stride)),
                      ttt_lora_phase_tokens=min(hp.ttt_lora_phase_tokens, max(1, LEGALITY_CHUNK_TOKENS // world_size)))


def perturbed_after(tokens: np.ndarray, p: int, keep_bos: bool, vocab_size: int) -> np.ndarray:
    """The stream with its tokens after p shuffled (the document boundaries kept where keep_bos) and token p+1
    surely changed, unless it is a BOS kept in place (lora_points avoids those): an update that read two targets
    past what it had scored shows only through p+1, which a shuffle can leave in place (a common token, or a
    tail of one token)."""
    other = tokens.copy()
    moved = np.arange(p + 1, len(other))
    if keep_bos:
        moved = moved[other[moved] != BOS_ID]
    other[moved] = np.random.default_rng(0).permutation(other[moved])
    if len(moved) and moved[0] == p + 1 and other[p + 1] == tokens[p + 1]:
        t = (int(tokens[p + 1]) + 1) % vocab_size
        other[p + 1] = (t + 1) % vocab_size if t == BOS_ID else t  # another token, and no new boundary
    return other


def legality_check(model: GPT, val: ValSet, dctx: Dist, hp: Hyperparameters, phase: Phase,
                   log=silent) -> bool | None:
    """Score val streams equal up to token p and different after it (p from perturbation_points): every
    target <= p must get the identical NLL. A method that looks at targets before scoring them fails this.
    Per-document scoring keeps the document boundaries (BOS) in place: they decide which documents share a
    batch, hence the shapes of the arithmetic, not what any score sees. Every pass runs eager, on
    deterministic kernels and reproducible attention, so that only the data can tell them apart; where they
    differ, the unperturbed stream is scored again, and if that differs too the check is inconclusive (None)."""
    eager = check_knobs(hp, dctx.world_size)
    points = perturbation_points(val.tokens, phase, eager, dctx.world_size)
    log(f"legality_check phase:{phase.name} points:{','.join(map(str, points))}")

    def scores(v: ValSet) -> torch.Tensor:
        return eval_tokens(model.replica(reproducible_attention), v, dctx, eager, phase).nll
    with deterministic_kernels():
        first = scores(val)
        for p in points:
            other = perturbed_after(val.tokens, p, phase.lora, model.cfg.vocab_size)
            if not torch.equal(first[:p], scores(val.with_tokens(other))[:p]):
                return False if torch.equal(first, scores(val)) else None
    return True


def compiled_graph_count() -> int:
    """Graphs torch.compile built so far: a phase logs its new_graphs (time that went on compiling)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def divergence_hint(phase: Phase, hp: Hyperparameters) -> str:
    if phase.slot != "off":
        return "lower SLOT_LR"
    if phase.ttt:
        return "lower TTT_LR" + ("" if hp.ttt_grad_clip else " or set TTT_GRAD_CLIP > 0")
    return "the model itself scores non-finite: check the training log"


@dataclasses.dataclass
class Evaluator:
    """The val set and how to score a model on it."""
    val: ValSet
    dctx: Dist
    hp: Hyperparameters
    log: object
    full_val: bool  # scores_whole_val, read once when the val set is

    def quick(self, model: GPT, seq_len: int, looped: bool) -> tuple[float, float]:
        """(val_loss, val_bpb) over plain windows in the layer order given: the checks during training."""
        phase = Phase("val", seq_len, seq_len, looped=looped)
        return eval_tokens(model, self.val, self.dctx, self.hp, phase).totals()

    def score(self, model: GPT, train_seq_len: int, load_seconds: float, broken: list[str]) -> dict:
        """broken: the rules scoring cannot see that the run broke (training_over_budget, artifact_over_limit, ...)."""
        return score_phases(model, train_seq_len, self.val, self.dctx, self.hp, self.log,
                            tuple(broken) + (() if self.full_val else ("val_subset",)), load_seconds)


def check_phases(model: GPT, val: ValSet, dctx: Dist, hp: Hyperparameters, phases: list[Phase], log) -> float:
    """LEGALITY_CHECK: the perturbation check of every phase after the roundtrip on a prefix of the val stream
    (legality_check); a legal phase that fails, or cannot be checked, stops the run. Returns the seconds."""
    t_check, check = time.perf_counter(), check_knobs(hp, dctx.world_size)
    lora = any(p.lora for p in phases)
    chunk = max(check.ttt_chunk_tokens, global_chunk_tokens(check, dctx.world_size) if lora else 0)
    prefix = val.prefix(4 * max(chunk, hp.eval_seq_len) + 1)
    log(f"legality_check tokens:{len(prefix.tokens)} chunk_tokens:{chunk}")  # eager, chunks of its own
    for phase in phases[1:]:
        t0 = time.perf_counter()
        ok = legality_check(model, prefix, dctx, hp, phase, log)
        log(f"legality_check phase:{phase.name} passed:{int(bool(ok))}" + (" reproducible:0" if ok is None else "")
            + f" time:{time.perf_counter() - t0:.1f}s")
        if ok is None and phase.legal:
            raise UserError(f"legality check of phase {phase.name} inconclusive: two scorings of the same "
                            "stream differ (kernels that are not reproducible on this machine)")
        if not ok and phase.legal:
            raise UserError(f"legality check failed for phase {phase.name}: scores depend on later tokens")
    return dctx.all_reduce_max(time.perf_counter() - t_check)


def score_phases(model: GPT, train_seq_len: int, val: ValSet, dctx: Dist, hp: Hyperparameters, log,
                 broken: tuple[str, ...] = (), load_seconds: float = 0.0) -> dict:
    """Run plan_phases' phases against the eval budget, logging each (after LEGALITY_CHECK's check_phases). The
    budget's clock starts load_seconds in: the artifact's decompression is evaluation time too. broken: why the
    run cannot score at all (a val subset, a rule outside scoring broken); a phase is valid where nothing is, the
    phase is legal and finite, and the eval so far (load and LEGALITY_CHECK included) ends inside EVAL_BUDGET_SECONDS
    and RULE_SECONDS. The summary's invalid_reasons says why a final score is not valid (none where it is); its
    final_eval_seconds is the clock the final score is judged by, eval_seconds includes a reference run after it;
    a non-finite phase stops the run, but for a reference phase after the final score (dropped, with a warning)."""
    phases = plan_phases(hp, train_seq_len)
    # the check runs after the load, before the phases: evaluation time like theirs
    check_seconds = check_phases(model, val, dctx, hp, phases, log) if hp.legality_check else 0.0
    results, elapsed, final = {}, load_seconds + check_seconds, None
    limit = min(hp.eval_budget_seconds, RULE_SECONDS)  # what a valid score may take; the knob alone paces phases
    for phase in phases:
        t0, graphs0 = time.perf_counter(), compiled_graph_count()
        time_left = max(hp.eval_budget_seconds - elapsed, 0.0)
        if time_left == 0 and budget_action(phase, hp) == "abandon":  # no time for a reference: not even its pace
            log(f"{phase.name}:skipped elapsed:{elapsed:.1f}s time_left:0s")
            continue
        scored_by = copy.deepcopy(model) if phase.ttt else model  # TTT adapts a copy: each phase starts fresh
        scores = eval_tokens(scored_by, val, dctx, hp, phase, log, time_left)
        if phase.ttt and scored_by.logit_caps is not None:
            log(f"{phase.name}_logit_caps:{','.join(f'{c:.4f}' for c in scored_by.logit_caps.tolist())}")
        secs = dctx.all_reduce_max(time.perf_counter() - t0)  # one clock for all ranks: equal time_left, one decision
        elapsed += secs
        if scores is None:
            continue
        val_loss, val_bpb = scores.totals()
        finite = math.isfinite(val_loss) and math.isfinite(val_bpb)
        in_budget = elapsed <= limit  # every phase so far counted, as the run spent it
        valid = phase.legal and finite and not broken and in_budget
        log(f"{phase.name} val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} eval_time:{secs:.1f}s valid:{int(valid)} "
            f"new_graphs:{compiled_graph_count() - graphs0}")
        if not finite and phase.reference and final is not None:  # a reference only: the final score stands
            log(f"warning:reference_not_finite phase:{phase.name} val_bpb:{val_bpb} action:dropped")
            continue
        if not finite:
            raise UserError(f"phase {phase.name} scored val_bpb {val_bpb}: not a score ({divergence_hint(phase, hp)})")
        results[f"{phase.name}_val_bpb"] = val_bpb
        if phase.legal and not phase.reference:
            final = dict(phase=phase.name, loss=val_loss, bpb=val_bpb, scores=scores, valid=valid, done_at=elapsed)
    log(f"eval_total_time:{elapsed:.1f}s budget:{hp.eval_budget_seconds:.0f}s")
    reasons = list(broken) + (["eval_over_budget"] if final["done_at"] > limit else [])
    if final["done_at"] > limit:
        log(f"warning:eval_over_budget phase:{final['phase']} done_at:{final['done_at']:.1f}s limit:{limit:.0f}s "
            f"eval_budget_seconds:{hp.eval_budget_seconds:.0f} rule_seconds:{RULE_SECONDS:.0f} final_valid:0 "
            "fix:drop_phases_before_it_or_shorten_ttt")
    if hp.dump_token_nll and dctx.is_main:
        dump_token_scores(Path(hp.dump_token_nll), final["scores"])
    return dict(final_phase=final["phase"], final_val_loss=final["loss"], final_val_bpb=final["bpb"],
                final_valid=int(final["valid"]), invalid_reasons=",".join(reasons) or "none",
                final_eval_seconds=final["done_at"], eval_seconds=elapsed) | results


PRIME_DOCS = 3  # per rank: LoRA TTT in one global chunk, or in three whose last scores after the budget stop


def priming_stream(world_size: int, seq_len: int, vocab_size: int) -> ValSet:
    """A made-up val stream whose scoring reaches every eval graph on every rank: per rank PRIME_DOCS
    documents of two windows each (batches of plain windows; LoRA steps from a first short window up to
    seq_len, updates in passes of their own)."""
    rng = np.random.default_rng(0)
    docs = [np.concatenate(([BOS_ID], rng.integers(BOS_ID + 1, vocab_size, 2 * seq_len - 1)))
            for _ in range(PRIME_DOCS * world_size)]
    tokens = np.concatenate(docs).astype(np.uint16)
    return ValSet(tokens, np.ones(len(tokens) - 1, dtype=np.int32), "synthetic")


def prime_eval(model: GPT, train_seq_len: int, dctx: Dist, hp: Hyperparameters, log) -> float:
    """Compile the eval graphs now, as training compiles its own before the clock: every phase scores
    priming_stream with a throwaway copy of the model. torch.compile keys a graph by code and shapes, not
    by weights, so the phases after training reuse them (each logs its new_graphs). Returns the seconds."""
    if not eval_compiles(hp, dctx.device):
        return 0.0
    t0, graphs0, caches0 = time.perf_counter(), compiled_graph_count(), compile_cache_counts()
    quiet = hp.replace(legality_check=False, dump_token_nll="", eval_budget_seconds=math.inf)
    seq_len = max(train_seq_len, hp.eval_seq_len)
    stream = priming_stream(dctx.world_size, seq_len, model.cfg.vocab_size)
    ttt = next((p for p in plan_phases(hp, train_seq_len) if p.lora), None)
    try:
        with torch.random.fork_rng(devices=[dctx.device] if dctx.device.type == "cuda" else []):
            score_phases(copy.deepcopy(model), train_seq_len, stream, dctx, quiet, silent, broken=("priming",))
            if ttt is not None and hp.ttt_budget_stop:  # LoRA TTT scoring on once the budget stopped its adapting
                # PRIME_DOCS global chunks: stopped after the second
                stopped = quiet.replace(ttt_lora_phase_tokens=2 * seq_len)
                eval_tokens(copy.deepcopy(model), stream, dctx, stopped, ttt, silent, time_left=0.0)
    except UserError as e:
        raise UserError(f"compiling the eval on a made-up stream before the clock (eval_prime): {e}") from None
    synchronize(dctx.device)
    if dctx.device.type == "cuda":
        torch.cuda.empty_cache()  # the priming's activations go back: training's memory is as it was
        torch.cuda.reset_peak_memory_stats(dctx.device)  # and its peak is training's
    secs = dctx.all_reduce_max(time.perf_counter() - t0)
    log(f"eval_prime time:{secs:.1f}s graphs:{compiled_graph_count() - graphs0} tokens:{len(stream.tokens)} "
        f"{cache_counts_line(caches0)}")
    return secs


def dump_token_scores(path: Path, scores: TokenScores):
    """npz with nll (float32 nats) and bytes (uint16) per target, in val order."""
    buf = io.BytesIO()
    np.savez(buf, nll=scores.nll.float().cpu().numpy(), bytes=scores.nbytes.cpu().numpy().astype(np.uint16))
    write_atomic(path, buf.getvalue(), overwrite=False)


# -----------------------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------------------

def plan_batches(hp: Hyperparameters, world_size: int, device: torch.device,
                 seq_len: int | None = None) -> tuple[int, int]:
    """(sequences per micro-batch, accumulation steps) at seq_len (default TRAIN_SEQ_LEN): a rank's share
    of the fixed global batch in the fewest equal micro-batches that fit MICRO_BATCH_TOKENS."""
    seq_len = seq_len or hp.train_seq_len
    name = "TRAIN_SEQ_LEN" if seq_len == hp.train_seq_len else f"length {seq_len} of TRAIN_SEQ_SCHEDULE"
    seqs, rem = divmod(hp.train_batch_tokens, seq_len * world_size)
    if rem or not seqs:
        raise UserError(f"env TRAIN_BATCH_TOKENS={hp.train_batch_tokens}: must be a positive multiple of "
                        f"{name}*WORLD_SIZE={seq_len * world_size}")
    cap = hp.micro_batch_tokens or (98304 if device.type == "cuda" else 16384)
    cap_seqs = max(1, cap // seq_len)
    accum = next(k for k in range(1, seqs + 1) if seqs % k == 0 and seqs // k <= cap_seqs)
    return seqs // accum, accum


class Trainer:
    """The model's optimizers, data stream, EMA and (compiled) forward; step() is one optimizer step."""

    def __init__(self, hp: Hyperparameters, dctx: Dist, model: GPT):
        self.hp, self.dctx, self.model = hp, dctx, model
        self.compiled = compile_applies(hp, dctx.device)
        if self.compiled:
            configure_inductor()
        direction = torch.compile(muon_direction, dynamic=False) if self.compiled else muon_direction
        self.optimizers = build_optimizers(model, hp, dctx, direction)
        self.adam, self.muon = self.optimizers
        self.replicated = [p for _, p in adam_params(model)]  # their grads are all-reduced whole
        # dynamic=False: each (length, looped) shape of TRAIN_SEQ_SCHEDULE gets a static graph of its own
        forward = torch.compile(model, fullgraph=True, dynamic=False) if self.compiled else model
        self.forward = lambda x, y, looped: forward(x, y, looped, fixed_cap=True)  # training keeps one softcap
        # GPTQ's calibration forward, fused like training's: its batches are inside the training budget
        self.matrix_inputs = torch.compile(matrix_inputs, fullgraph=True, dynamic=False) if self.compiled \
            else matrix_inputs
        self.plans = {L: plan_batches(hp, dctx.world_size, dctx.device, L) for L, _ in seq_schedule(hp)}
        self.ema = [p.detach().float().clone() for p in model.parameters()] if hp.ema_decay else None
        self.streams, self.ahead = {}, None  # {length: its stream}; (length, batch) loaded ahead

    def use_streams(self, streams: dict):
        """Draw each length's batches from streams[length], from where it stands; a batch loaded ahead goes."""
        self.streams, self.ahead = streams, None

    def reset_stream(self, files):
        """Fresh streams from the train shards, one per sequence length of the schedule, each at its start: all
        built (and checked) now, not where training first reaches a length. A length other than TRAIN_SEQ_LEN
        draws from a stream of its own seed (a permutation of its windows)."""
        hp = self.hp
        self.use_streams({L: TrainStream(files, L, hp.seed if L == hp.train_seq_len else (hp.seed, L), hp.vocab_size)
                          for L in self.plans})

    def _load_batch(self, seq_len: int) -> torch.Tensor:
        """This rank's rows of the next global batch of seq_len sequences, on its way to the device (async on CUDA)."""
        micro, accum = self.plans[seq_len]
        local = micro * accum
        rows = slice(self.dctx.rank * local, (self.dctx.rank + 1) * local)
        batch = torch.from_numpy(self.streams[seq_len].next_batch(local * self.dctx.world_size, rows))
        if self.dctx.device.type == "cuda":
            batch = batch.pin_memory().to(self.dctx.device, non_blocking=True)
        return batch

    def _sync_grads(self):
        """Banks' grads reduce-scattered (Parallel Muon), the rest in one flat all-reduce (gloo has no AVG);
        clipped by the global norm of the mean gradient, so the update is the same for any world size."""
        self.muon.reduce_scatter()
        for p in self.replicated:  # read by no forward this step (a one-layer model's looped-only skip): grad zero
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.replicated]
        self.dctx.all_reduce_flat_(grads, divisor=self.dctx.world_size)
        shards = self.muon.shard_grads()
        if self.hp.grad_clip_norm:
            bank_sq = self.dctx.all_reduce_sum(sum(s.float().square().sum() for s in shards))
            norm = (bank_sq + sum(g.float().square().sum() for g in grads)).sqrt()
            scale = (self.hp.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads + shards, scale)

    def step(self, step: int, lr_mul: float, seq_len: int, looped: bool) -> torch.Tensor:
        """Queue one optimizer step on the next global batch of seq_len sequences (same tokens per step at any
        length, other micro-batches); the mean train loss as a device scalar (nothing here waits for the GPU:
        the caller decides when to read it). A batch loaded ahead for another length goes unused."""
        micro, accum = self.plans[seq_len]
        batch = self.ahead[1] if self.ahead is not None and self.ahead[0] == seq_len else self._load_batch(seq_len)
        loss_sum = torch.zeros((), device=self.dctx.device)
        for m in range(accum):
            mb = batch[m * micro:(m + 1) * micro]
            with autocast_ctx(self.dctx.device):
                loss = self.forward(mb[:, :-1], mb[:, 1:], looped).mean()
            (loss / accum).backward()
            loss_sum += loss.detach()
        self.ahead = seq_len, self._load_batch(seq_len)  # read from disk while the GPU works through this step
        self._sync_grads()
        mom = muon_momentum(step, self.hp)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mul
                if "momentum" in g:
                    g["momentum"] = mom
            opt.step()
        self.model.zero_grad(set_to_none=True)  # backward then writes fresh grads: no zero fill, no add
        if self.ema is not None:
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.model.parameters()], 1 - self.hp.ema_decay)
        return self.dctx.all_reduce_sum(loss_sum) / (accum * self.dctx.world_size)

    def snapshot(self):
        """Copies of the weights and optimizer states, so that warm-up can be undone."""
        return copy.deepcopy(self.model.state_dict()), [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]

    def restore(self, snap):
        model_state, opt_states = snap
        self.model.load_state_dict(model_state)
        for opt, st in zip(self.optimizers, opt_states):
            opt.load_state_dict(st)
        if self.ema is not None:
            self.ema = [p.detach().float().clone() for p in self.model.parameters()]

    def apply_ema(self):
        if self.ema is not None:
            with torch.no_grad():
                for p, e in zip(self.model.parameters(), self.ema):
                    p.copy_(e)


class PendingScalar:
    """A device scalar on its way to the host: the copy is queued behind the work that produces it, and
    read() waits for that work only. A late .item() would wait for everything queued since, the next
    step too, draining the GPU's queue every step (results/2026-11-24_softcap_ce_loss_read/)."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.is_cuda:
            self.host = torch.empty((), dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t.detach().clone()

    def read(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return self.host.item()


class TrainClock:
    """Training wall time in ms, read only where the host waits for the GPU anyway (a loss read), paused
    for validation; all ranks take the slowest rank's reading, so they stop on the same step."""

    def __init__(self, dctx: Dist):
        self.dctx, self.ms, self.t0 = dctx, 0.0, time.perf_counter()

    def read(self):
        now = time.perf_counter()
        self.ms = self.dctx.all_reduce_max(self.ms + 1000 * (now - self.t0))
        self.t0 = now

    def resume(self):
        self.t0 = time.perf_counter()


def prime_compile(trainer: Trainer, hp: Hyperparameters, train_files, log):
    """Run WARMUP_STEPS real steps (at least one per shape training reaches: train_shapes) so compilation
    is off the clock, then undo them all; and one calibration batch, whose compiled forward the Hessians take
    inside the training budget (a measured reserve has compiled it already)."""
    shapes = train_shapes(hp)
    n = max(hp.warmup_steps, len(shapes)) if hp.warmup_steps else 0  # every shape at least once
    if n:
        snap = trainer.snapshot()
        trainer.reset_stream(train_files)
        seen = set()
        for k in range(n):
            seq_len, looped = shapes[k * len(shapes) // n]
            t0 = time.perf_counter()
            trainer.step(0, 1.0, seq_len, looped)
            if (seq_len, looped) not in seen:  # a shape's first step compiles its graph: where start-up goes
                seen.add((seq_len, looped))
                synchronize(trainer.dctx.device)
                log(f"warmup_shape seq_len:{seq_len} looped:{int(looped)} time:{time.perf_counter() - t0:.1f}s")
            if k + 1 == n or (k + 1) % 10 == 0:
                log(f"warmup_step:{k + 1}/{n} looped:{int(looped)}"
                    + (f" seq_len:{seq_len}" if hp.train_seq_schedule else ""))
        trainer.restore(snap)
        if trainer.compiled and hp.gptq_calibration_batches:
            with torch.no_grad():
                calibration_batches(trainer.model, train_files, hp, trainer.plans[hp.train_seq_len], trainer.dctx,
                                    trainer.matrix_inputs)(HessianRecorder())
    trainer.reset_stream(train_files)
    synchronize(trainer.dctx.device)  # the priming steps were queued asynchronously; none may reach the clock


LR_KNOBS = ("MATRIX_LR", "SCALAR_LR", "TIED_EMBED_LR")


def divergence_lr_hint(hp: Hyperparameters) -> str:
    """After a divergence, lower the learning rates raised above their defaults, else all (a NaN spreads
    to every weight within a step, so the weights cannot tell which)."""
    raised = [k for k in LR_KNOBS if getattr(hp, k.lower()) > next(kn.default for kn in KNOBS if kn.name == k)]
    return f"lower {' or '.join(raised or LR_KNOBS)}, or set GRAD_CLIP_NORM"


def log_train_step(hp: Hyperparameters, dctx: Dist, clock: TrainClock, cap_ms: float, entry, log):
    """Wait for queued step `entry` = (k, pending loss, model FLOPs of steps 1..k); read the clock; log."""
    k, pending_loss, flops_done = entry
    loss = pending_loss.read()
    clock.read()
    if not math.isfinite(loss):
        raise UserError(f"train_loss became {loss} at step {k}: stopping ({divergence_lr_hint(hp)})")
    if k <= 5 or k % hp.train_log_every == 0:
        avg = clock.ms / k
        eta = (cap_ms - clock.ms) / 1000 if cap_ms else (hp.iterations - k) * avg / 1000
        peak = device_peak_flops(dctx.device)
        mfu = f" mfu:{100 * flops_done / (clock.ms / 1000) / (peak * dctx.world_size):.1f}%" if peak else ""
        log(f"step:{k}/{hp.iterations} train_loss:{loss:.4f} train_time:{clock.ms / 1000:.1f}s "
            f"step_avg:{avg:.2f}ms tok_s:{hp.train_batch_tokens / avg * 1000:.0f} eta:{max(eta, 0):.0f}s{mfu}")


class ClockCap(NamedTuple):
    """The training clock's cap in ms (0: none), MAX_WALLCLOCK_SECONDS less the Hessians' reserve, and where that
    reserve came from."""
    ms: float
    reserve_s: float = 0.0
    source: str = ""

    def line(self) -> str:
        return (f"train_clock_cap:{self.ms / 1000:.1f}s gptq_reserve:{self.reserve_s:.1f}s reserve_source:{self.source}"
                if self.ms else "train_clock_cap:none")


def train_clock_cap(hp: Hyperparameters, dctx: Dist, trainer: Trainer, train_files) -> ClockCap:
    """MAX_WALLCLOCK_SECONDS less the Hessians' reserve, so that the training data's last touch stays inside the
    training budget. The loop ends training inside the cap (train's stop rule), so the reserve holds the Hessians
    alone."""
    if not hp.max_wallclock_seconds:
        return ClockCap(0.0)
    reserve, source = gptq_reserve(trainer.model, train_files, hp, trainer.plans[hp.train_seq_len], dctx,
                                   trainer.matrix_inputs)
    if reserve >= hp.max_wallclock_seconds:
        raise UserError(f"MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds}: leaves no training time after the "
                        f"Hessians' reserve of {reserve:.1f}s ({source}); raise it"
                        + (" or lower GPTQ_CALIBRATION_BATCHES" if source.startswith("measured") else ""))
    return ClockCap(1000 * (hp.max_wallclock_seconds - reserve), reserve, source)


def past_cap(clock_ms: float, read_ms: float, step: int, cap_ms: float) -> bool:
    """Whether training stops now, the clock last read after step-1 steps (clock_ms; read_ms at the check before)
    while step `step` runs: once one more step would end past cap_ms, so that the step in flight still ends inside
    it. A step's time is the average or, where longer, the latest (steps slow down as looping starts)."""
    step_ms = max(clock_ms / max(step - 1, 1), clock_ms - read_ms)
    return bool(cap_ms) and clock_ms + 2 * step_ms >= cap_ms


def train(hp: Hyperparameters, dctx: Dist, trainer: Trainer, train_files, evaluator: Evaluator, cap_ms: float,
          log) -> dict:
    """Train until ITERATIONS or the clock's cap_ms (0: none), validating every VAL_LOSS_EVERY steps (off the
    clock). Step k+1 is queued before step k's loss is read, so the GPU never waits for the host."""
    t0, caches0 = time.perf_counter(), compile_cache_counts()
    prime_compile(trainer, hp, train_files, log)
    warmup_s = dctx.all_reduce_max(time.perf_counter() - t0)  # compile and warm-up: before the clock, not free
    log(f"warmup_done time:{warmup_s:.1f}s" + (f" {cache_counts_line(caches0)}" if trainer.compiled else ""))
    clock, schedule = TrainClock(dctx), seq_schedule(hp)
    step, looped, last_val, queued, flops_done, switched_at = 0, False, None, None, 0.0, None
    seq_len = seq_len_at(schedule, 0.0)
    read_ms = 0.0  # the clock at the previous check
    while True:
        # whichever limit binds first ends the schedule: the clock's share or the steps' share of ITERATIONS
        progress = max(clock.ms / cap_ms if cap_ms else 0.0, step / hp.iterations)
        done = step >= hp.iterations or past_cap(clock.ms, read_ms, step, cap_ms)
        if hp.num_loops and not looped and progress >= hp.enable_looping_at and not done:
            looped = True
            log(f"layer_loop:enabled step:{step} progress:{progress:.3f}")
        read_ms = clock.ms
        if done or (hp.val_loss_every and step and step % hp.val_loss_every == 0):
            if queued:
                log_train_step(hp, dctx, clock, cap_ms, queued, log)
                queued = None
            # off the clock; the model as trained so far, and at the end as it is exported and scored: looped
            last_val = evaluator.quick(trainer.model, hp.train_seq_len, looped or bool(done))
            log(f"step:{step}/{hp.iterations} val_loss:{last_val[0]:.4f} val_bpb:{last_val[1]:.4f} "
                f"train_time:{clock.ms / 1000:.1f}s step_avg:{clock.ms / max(step, 1):.2f}ms")
            clock.resume()
        if done:
            break
        if seq_len_at(schedule, progress) != seq_len:  # a new stream: the batch loaded ahead goes unused
            seq_len, switched_at = seq_len_at(schedule, progress), step
            log(f"seq_len:{seq_len} step:{step} progress:{progress:.3f}")
        lr_mul = lr_multiplier(progress, hp.warmdown_frac, hp.min_lr)
        if switched_at is not None:  # a new length re-warms the LR
            lr_mul *= min(1.0, (step - switched_at + 1) / SEQ_REWARM_STEPS)
        loss_t = trainer.step(step, lr_mul, seq_len, looped)
        step += 1
        flops_done += hp.train_batch_tokens * model_flops_per_token(trainer.model.cfg, seq_len, looped)
        if queued:
            log_train_step(hp, dctx, clock, cap_ms, queued, log)
        queued = (step, PendingScalar(loss_t), flops_done)
    stop_reason = "wallclock_cap" if step < hp.iterations else "iterations"
    log(f"stopping:{stop_reason} step:{step} train_time:{clock.ms / 1000:.3f}s")
    if hp.num_loops and not looped:  # exported and scored with the recurrence all the same: say so
        log(f"warning:loop_never_trained ENABLE_LOOPING_AT={hp.enable_looping_at} was not reached before training "
            "ended: the model is scored with depth recurrence it never trained with")
    return dict(steps=step, train_ms=clock.ms, stop_reason=stop_reason, val=last_val, warmup_s=warmup_s)


# Export, inside the training budget: GPTQ's Hessians from training batches (the reserve they need, measured
# before the clock), then the clip that fills the artifact to the byte limit.

def calibration_batches(model: GPT, train_files, hp: Hyperparameters, plan: tuple[int, int], dctx: Dist,
                        inputs=matrix_inputs):
    """A function that runs the next calibration batch through the looped model into a HessianRecorder;
    inputs: matrix_inputs or its compiled form."""
    micro_seqs, accum = plan
    stream = TrainStream(train_files, hp.train_seq_len, hp.seed + 1, hp.vocab_size)
    local = micro_seqs * accum
    rows = slice(dctx.rank * local, (dctx.rank + 1) * local)

    def calibrate(recorder: HessianRecorder):
        batch = torch.from_numpy(stream.next_batch(local * dctx.world_size, rows)).to(dctx.device)
        for micro in batch.split(micro_seqs):
            with autocast_ctx(dctx.device):
                seen = inputs(model, micro[:, :-1])
            for key, x in seen:
                recorder(key, x)
    return calibrate


# The measured reserve's margin over GPTQ_CALIBRATION_BATCHES timed batches: batch-to-batch noise, the
# last batch's synchronize and the ranks' all-reduce of the sums, the last training step's jitter.
RESERVE_MARGIN, RESERVE_SLACK_SECONDS = 1.25, 1.0


@torch.no_grad()
def gptq_reserve(model: GPT, train_files, hp: Hyperparameters, plan: tuple[int, int], dctx: Dist,
                 inputs=matrix_inputs) -> tuple[float, str]:
    """(seconds taken off MAX_WALLCLOCK_SECONDS for the Hessians, where they came from, for the log):
    GPTQ_RESERVE_SECONDS where set, else measured before the clock, as the Hessians' cost differs by
    GPU and by GPU count: one batch timed after an untimed one (buffers, kernel choice, a compiled `inputs`'s
    graph), the slowest rank's. Without Hessians the slack alone."""
    if hp.gptq_reserve_seconds:
        return hp.gptq_reserve_seconds, "GPTQ_RESERVE_SECONDS"
    if not hp.gptq_calibration_batches:
        return RESERVE_SLACK_SECONDS, "no_hessians"  # the last step's jitter, the closing synchronize
    calibrate = calibration_batches(model, train_files, hp, plan, dctx, inputs)
    calibrate(HessianRecorder())
    synchronize(dctx.device)
    t0 = time.perf_counter()
    calibrate(HessianRecorder())
    synchronize(dctx.device)
    batch_s = dctx.all_reduce_max(time.perf_counter() - t0)
    return (RESERVE_MARGIN * batch_s * hp.gptq_calibration_batches + RESERVE_SLACK_SECONDS,
            f"measured calibration_batch:{batch_s:.3f}s reserve_batches:{hp.gptq_calibration_batches}")


@torch.no_grad()
def collect_hessians(model: GPT, train_files, hp: Hyperparameters, plan: tuple[int, int], dctx: Dist,
                     inputs=matrix_inputs) -> dict:
    """Input Hessians, the mean of x x^T over the inputs of every GPTQ'd matrix (GPTQ is blind to their scale,
    AWQ-lite compares them across matrices), from fresh training batches (never val data) through the
    looped model, summed over ranks so every rank quantizes identically. A calibration batch is a global
    training batch, each rank's rows in its micro-batches (plan: training's), so that any number of GPUs
    calibrates on the same tokens, as it trains on them."""
    if not hp.gptq_calibration_batches:
        return {}
    recorder, calibrate = HessianRecorder(), calibration_batches(model, train_files, hp, plan, dctx, inputs)
    for _ in range(hp.gptq_calibration_batches):
        calibrate(recorder)
    for key in sorted(recorder.hessians):
        dctx.all_reduce_sum(recorder.hessians[key])
    bad = [key for key, H in sorted(recorder.hessians.items()) if not torch.isfinite(H).all()]
    if bad:  # GPTQ could only fail on them with a bare error after its retries
        raise UserError(f"GPTQ Hessians not finite for {', '.join(map(str, bad[:3]))}"
                        f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}: the model's activations overflow on "
                        "training batches")
    return {key: H / (recorder.rows[key] * dctx.world_size) for key, H in recorder.hessians.items()}


def quantize_within_budget(state: dict, hessians: dict, cfg: ModelConfig, hp: Hyperparameters, code_bytes: int,
                           log, meta: dict | None = None) -> tuple[bytes, float]:
    """GPTQ (+ LQER) + pack at MATRIX_CLIP_SIGMAS, then up to CLIP_SEARCH_STEPS tries moving the clip to
    land under the cap within CLIP_SEARCH_HEADROOM, each measuring the whole blob. `meta` goes into the
    artifact's config. Returns, of the blobs that fit, the one of least output_error (without Hessians: of the
    smallest clip), else the last one tried. A smaller clip buys precision with bytes only down to a point:
    past it (a model far under the cap) clipping costs more, so a fitting try worse than the best ends the search."""
    damps = gptq_damps(hp)

    def attempt(k: float) -> tuple[bytes, float]:
        t0 = time.perf_counter()
        q = quantize_state(state, hessians, cfg.num_layers, hp.matrix_bits, k, hp.embed_bits, hp.embed_clip_sigmas,
                           hp.awq_groups, hp.mlp_clip_scale, damps)
        if hp.awq_groups:
            log(awq_line(q, cfg.num_layers))
        if hp.lqer_top_k:
            report = apply_lqer(state, q, hp.lqer_top_k, hp.lqer_rank, hp.lqer_group, cfg.num_layers, hessians,
                                hp.lqer_fit)
            log(lqer_line(report, q, hp))
        err = output_error(state, q, hessians, cfg.num_layers) if hessians else k  # no Hessians: smaller k wins
        t1 = time.perf_counter()
        config = dict(model=dataclasses.asdict(cfg), train_seq_len=hp.train_seq_len, matrix_clip_sigmas=k,
                      mlp_clip_scale=hp.mlp_clip_scale) | (meta or {})
        blob = pack_artifact(q, config, hp.artifact_coder)
        log(f"gptq_try matrix_clip_sigmas:{k:.4f} artifact_bytes:{len(blob) + code_bytes} "
            f"gptq_time:{t1 - t0:.1f}s pack_time:{time.perf_counter() - t1:.1f}s"
            + (f" output_error:{err:.6g}" if hessians else ""))
        return blob, err

    k, tries, best = hp.matrix_clip_sigmas, [], None
    for _ in range(hp.clip_search_steps + 1):
        blob, err = attempt(k)
        tries.append((k, len(blob) + code_bytes))
        spare = ARTIFACT_LIMIT_BYTES - tries[-1][1]
        if spare >= 0:
            if best is not None and err > best[2]:
                break  # past the clip where precision still pays
            best = (blob, k, err)
            if spare < CLIP_SEARCH_HEADROOM:
                break
        k = next_clip(tries, ARTIFACT_LIMIT_BYTES - CLIP_SEARCH_HEADROOM // 2)
    return best[:2] if best else (blob, tries[-1][0])


def output_error(state: dict[str, torch.Tensor], qstate: dict[str, dict], hessians: dict, num_layers: int) -> float:
    """Sum over the GPTQ'd bank slices of tr(E H E^T), E = W - its dequantized rows (LQER's included), H the
    slice's input Hessian: the error GPTQ minimizes, as the matrices' outputs feel it. The embedding, whose
    clip the search does not move, is left out."""
    total = 0.0
    for name, e in qstate.items():
        if "q" not in e or name not in BANKS:
            continue
        keys = hessian_keys(name, num_layers)
        W = state[name].detach().float()
        E = (W - dequantize_matrix(e).to(W.device)).reshape(len(keys), *W.shape[-2:])
        total += hessian_error(E, torch.stack([hessians[key] for key in keys]).to(W.device, torch.float32))
    return total


CLIP_BYTES_ELASTICITY = 0.3  # an artifact's bytes fall about as clip^-0.3 near the cap: the first step's guess


def next_clip(tries: list[tuple[float, int]], target: int) -> float:
    """The next clip to try for an artifact of `target` bytes, from the (clip, bytes) tried so far (bytes
    fall as the clip rises): interpolated in log-log between the nearest tries on either side of the target,
    kept off their ends; else extrapolated from the last two (from one: CLIP_BYTES_ELASTICITY), by a factor of
    at most 1.15. Each try is a whole GPTQ + pack, so fewer tries than bisection's pay."""
    target = max(target, 1)  # a cap inside the headroom (tests): aim as low as there is
    over = [t for t in tries if t[1] > target]
    under = [t for t in tries if t[1] <= target]
    if over and under:
        (k0, b0), (k1, b1) = max(over), min(under)  # the largest clip still too big, the smallest that fits
        f = math.log(b0 / target) / math.log(b0 / b1)  # b0 > target >= b1
        return math.exp(math.log(k0) + min(max(f, 0.1), 0.9) * math.log(k1 / k0))
    (k0, b0), (k1, b1) = tries[-2] if len(tries) > 1 else (None, None), tries[-1]
    slope = math.log(b1 / b0) / math.log(k1 / k0) if k0 and k0 != k1 and b0 != b1 else -CLIP_BYTES_ELASTICITY
    step = math.log(target / b1) / min(slope, -0.05)  # a flat or rising response still moves the right way
    return k1 * math.exp(min(max(step, -math.log(1.15)), math.log(1.15)))


def awq_line(qstate: dict[str, dict], num_layers: int) -> str:
    """The `awq:` log line: each int8 column group as matrix slice:first column, and the bytes of the mask and
    scale fields (the int8 codes' own cost is in the artifact's size: compare gptq_try with AWQ_GROUPS=0)."""
    groups = [f"{slice_label(name, k, num_layers)}:{c}" for name, e in qstate.items() if "awq.cols" in e
              for k, row in enumerate(e["awq.cols"].reshape(-1, e["awq.cols"].size(-1)).bool())
              for c in row.nonzero().flatten()[::AWQ_GROUP_COLS].tolist()]
    return (f"awq: groups:{len(groups)} bits:{AWQ_BITS} cols:{AWQ_GROUP_COLS} {' '.join(groups)} "
            f"field_bytes:{field_bytes(qstate, AWQ_FIELD)}")


def lqer_line(report: list[dict], qstate: dict[str, dict], hp: Hyperparameters) -> str:
    """The `lqer:` log line: each chosen matrix's GPTQ error (apply_lqer's) before -> after (or `dropped`), and bytes."""
    parts = [f"{r['label']}:{r['before']:.6g}->" + (f"{r['after']:.6g}" if r["kept"] else "dropped") for r in report]
    return (f"lqer: top_k:{hp.lqer_top_k} rank:{hp.lqer_rank} group:{hp.lqer_group} {' '.join(parts)} "
            f"bytes:{field_bytes(qstate, LQER_FIELD)}")


# -----------------------------------------------------------------------------------------
# Main: setup -> data -> model -> train -> export -> score the artifact
# -----------------------------------------------------------------------------------------

def describe_environment(hp: Hyperparameters, dctx: Dist, code: bytes) -> list[str]:
    lines = ["hyperparameters:"] + [f"  {k}: {knob_text(v)}" for k, v in hp.items()]

    def git(*args) -> bytes:
        return subprocess.run(["git", *args], capture_output=True, cwd=Path(__file__).parent, timeout=5).stdout
    # scripts/pack_code.py names the packed program after its source's sha256: "+stale" where that is not the
    # commit's train_gpt.py (a build from other source), "+dirty" where tracked files differ from the commit
    packed = re.fullmatch(r"<packed train_gpt\.py sha256:([0-9a-f]{16})>", describe_environment.__code__.co_filename)
    try:
        commit = git("rev-parse", "--short", "HEAD").decode().strip() or "none"
        if commit != "none" and packed and \
                hashlib.sha256(git("show", "HEAD:train_gpt.py")).hexdigest()[:16] != packed[1]:
            commit += "+stale"
        if commit != "none" and git("status", "--porcelain", "--untracked-files=no").strip():
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        commit = "none"
    lines.append(f"code_sha256:{hashlib.sha256(code).hexdigest()[:16]} git_commit:{commit}"
                 + (f" packed_from:{packed[1]}" if packed else ""))
    lines.append(f"python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__} "
                 f"sentencepiece:{spm.__version__} brotli:{brotli.__version__}")
    found = []
    for dist_name in ("flash-attn-4", "nvidia-cutlass-dsl", "flash-attn-3", "flash-attn"):  # optional kernels
        try:
            found.append(f"{dist_name}={importlib.metadata.version(dist_name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    lines.append(f"attention_packages:{','.join(found) or 'none'}")
    name = torch.cuda.get_device_name(dctx.device) if dctx.device.type == "cuda" else platform.processor() or "cpu"
    lines.append(f"device:{dctx.device.type} device_name:{name.replace(' ', '_')} world_size:{dctx.world_size}")
    return lines


def load_val(hp: Hyperparameters, vocab_size: int, sp) -> tuple[ValSet, list[str]]:
    """The val tokens and their byte counts: from the byte sidecars where the shards have them, else
    from the tokenizer's pieces (refused for a CaseOps tokenizer, whose pieces are not the text)."""
    files = shard_files(hp.data_path, "val", hp.val_files)
    tokens = load_val_tokens(files, vocab_size, hp.val_max_tokens)
    if len(tokens) <= max(hp.train_seq_len, hp.eval_seq_len):
        raise UserError(f"val shards {files[0]}...: {len(tokens)} tokens, need > TRAIN_SEQ_LEN and EVAL_SEQ_LEN "
                        f"(one window)")
    token_bytes = load_val_sidecars(files, len(tokens))
    lut = build_byte_lut(sp, vocab_size)
    if token_bytes is not None:
        check_sidecar(token_bytes, tokens, lut, files)
        return ValSet.from_sidecar(tokens, token_bytes), files
    if is_caseops(sp):
        raise UserError(f"tokenizer {hp.tokenizer_path} is a CaseOps tokenizer, but the val shards have no byte "
                        f"sidecars (fineweb_val_bytes_NNNNNN.bin beside each fineweb_val_NNNNNN.bin): its pieces "
                        f"do not tell the original bytes")
    return ValSet.from_lut(tokens, lut), files


def load_evaluator(hp: Hyperparameters, dctx: Dist, log, vocab_size: int,
                   vocab_owner: str = "VOCAB_SIZE") -> tuple[Evaluator, str]:
    """The val set with its byte counts, and the tokenizer's sha256 (the log and the artifact record it)."""
    sp = load_tokenizer(hp.tokenizer_path, vocab_size, vocab_owner)
    sha = file_sha256(hp.tokenizer_path)
    log(f"tokenizer:{hp.tokenizer_path} tokenizer_sha256:{sha} vocab_size:{vocab_size}")
    val, files = load_val(hp, vocab_size, sp)
    full_val = scores_whole_val(hp)
    log(f"val_shards:{len(files)} val_tokens:{len(val.tokens) - 1} val_bytes:{int(val.target_bytes.sum())} "
        f"val_byte_source:{val.byte_source} full_val:{int(full_val)} data:{hp.data_path}")
    unknown = int((val.tokens[1:] == sp.unk_id()).sum())
    if unknown and val.byte_source != "sidecar":  # the text it replaced is not in the shard: charged 0 bytes
        log(f"warning:val_unknown_tokens count:{unknown} the tokenizer has no piece (nor byte fallback) for some val "
            "text: each <unk> counts 0 bytes, as the challenge's reference does, so bpb leaves that text out")
    return Evaluator(val, dctx, hp, log, full_val), sha


def build_model(hp: Hyperparameters, dctx: Dist, attention, log) -> tuple[GPT, Trainer]:
    cfg = hp.model_config()
    model = GPT(cfg, attention).to(dctx.device)
    trainer = Trainer(hp, dctx, model)
    log(f"model_params:{sum(p.numel() for p in model.parameters())} "
        f"layer_order_looped:{','.join(map(str, cfg.layer_order(True)))} "
        f"flops_per_token:{model_flops_per_token(cfg, hp.train_seq_len, False):.4g} "
        f"flops_per_token_looped:{model_flops_per_token(cfg, hp.train_seq_len, True):.4g}")
    log(f"features: xsa_last_n:{cfg.xsa_last_n} qk_gain_init:{cfg.qk_gain_init} num_loops:{cfg.num_loops} "
        f"loop:{cfg.loop_start}-{cfg.loop_end}@{hp.enable_looping_at} parallel_residual_start:{cfg.parallel_residual_start} "
        f"rope_dims:{model.rope_dims} ln_scale:{int(cfg.ln_scale)} skip_gates:{int(cfg.skip_gates)} "
        f"mlp_leaky_slope:{cfg.mlp_leaky_slope} smear_gate:{int(cfg.smear_gate)} attn_gate:{int(cfg.attn_gate)} "
        f"asym_logit:{int(cfg.asym_logit)} muon_row_normalize:{int(hp.muon_row_normalize)} "
        f"muon_ns_schedule:{hp.muon_ns_schedule} ema_decay:{hp.ema_decay} parallel_muon_world:{dctx.world_size}")
    micro, accum = trainer.plans[hp.train_seq_len]
    log(f"batch_tokens:{hp.train_batch_tokens} micro_batch_seqs:{micro} grad_accum:{accum} "
        f"compile:{int(trainer.compiled)}")
    return model, trainer


def train_limit(hp: Hyperparameters) -> float:
    """Seconds within which a valid run's training (the Hessians included) ends: MAX_WALLCLOCK_SECONDS where it is
    tighter than the rule (0, no cap: the rule's)."""
    return min(hp.max_wallclock_seconds or RULE_SECONDS, RULE_SECONDS)


def over_budget_fix(hp: Hyperparameters, reserve_needed: float) -> str:
    """What keeps the next run's training data inside its budget: a larger reserve under a cap; without a cap
    (MAX_WALLCLOCK_SECONDS=0, training for the rule's whole time) a cap, as no reserve applies."""
    if hp.max_wallclock_seconds:
        return f"lower MAX_WALLCLOCK_SECONDS, or set GPTQ_RESERVE_SECONDS to at least {reserve_needed:.1f}"
    return f"set MAX_WALLCLOCK_SECONDS (at most {RULE_SECONDS:.0f}): without a cap no reserve is kept for the Hessians"


def export(hp: Hyperparameters, dctx: Dist, trainer: Trainer, train_files, result: dict, reserve_s: float, code: bytes,
           run_id: str, tokenizer_sha: str, log) -> tuple[Path, dict]:
    """EMA weights -> Hessians (train data, inside the training budget; reserve_s: the clock kept for them) ->
    GPTQ -> the artifact, made and written by rank 0, never over an existing file; one over the cap is kept under
    a name that says so."""
    model = trainer.model
    trainer.apply_ema()
    t0 = time.perf_counter()
    hessians = collect_hessians(model, train_files, hp, trainer.plans[hp.train_seq_len], dctx, trainer.matrix_inputs)
    synchronize(dctx.device)  # the last batch's work may still be queued
    hess_s = dctx.all_reduce_max(time.perf_counter() - t0)
    data_s = result["train_ms"] / 1000 + hess_s
    limit = train_limit(hp)
    in_budget = data_s <= limit
    log(f"gptq_hessians:{len(hessians)} batches:{hp.gptq_calibration_batches} time:{hess_s:.1f}s "
        f"train_data_last_touched:{data_s:.1f}s")
    if not in_budget:  # training data read after the training budget: the score cannot count
        log(f"warning:hessians_outside_budget {data_s:.1f}s > {limit:.0f}s (MAX_WALLCLOCK_SECONDS="
            f"{hp.max_wallclock_seconds}, the rule {RULE_SECONDS:.0f}): final_valid:0 (training ended at "
            f"{result['train_ms'] / 1000:.1f}s, the Hessians took {hess_s:.1f}s: "
            f"{over_budget_fix(hp, reserve_s + data_s - limit)})")
    # EVAL_ONLY counts the code that wrote it and scores it as valid only where its training kept the budget
    meta = dict(tokenizer_sha256=tokenizer_sha, code_bytes=len(code), train_data_in_budget=int(in_budget))
    # Rank 0 alone quantizes and writes; every rank takes its size and path (ranks could round differently).
    blob, clip = quantize_within_budget(model.state_dict(), hessians, model.cfg, hp, len(code), log, meta) \
        if dctx.is_main else (None, None)
    model_bytes, clip = dctx.broadcast_object((len(blob), clip) if dctx.is_main else None)
    total = model_bytes + len(code)
    over = total > ARTIFACT_LIMIT_BYTES
    artifact = artifact_path(hp, run_id, over_limit=over)
    log(f"artifact:{artifact} model_bytes:{model_bytes} code_bytes:{len(code)} artifact_bytes:{total} "
        f"limit:{ARTIFACT_LIMIT_BYTES} headroom:{ARTIFACT_LIMIT_BYTES - total} matrix_clip_sigmas:{clip:.4f} "
        f"mlp_clip_scale:{hp.mlp_clip_scale}")
    if dctx.is_main:
        write_atomic(artifact, blob, overwrite=False)
        if hp.prequant_save:  # after the artifact: a failure here costs only this extra file
            try:
                save_prequant(Path(hp.prequant_save), model, hessians, hp, len(code), meta)
                log(f"prequant_saved:{hp.prequant_save}")
            except UserError as e:
                log(f"warning:prequant_not_saved {e}")
    return artifact, dict(artifact_bytes=total, model_bytes=model_bytes, code_bytes=len(code),
                          train_data_in_budget=int(in_budget))


PREQUANT_FIELDS = ("state", "hessians", "model", "train_seq_len", "code_bytes", "meta", "export")


def save_prequant(path: Path, model: GPT, hessians: dict, hp: Hyperparameters, code_bytes: int, meta: dict):
    """PREQUANT_SAVE: what an export quantizes (EMA weights, Hessians), its export knobs and what its artifact
    records, as torch.save of tensors and plain values only (load_prequant reads it with weights_only)."""
    buf = io.BytesIO()
    export = {kn.name: knob_text(getattr(hp, kn.name.lower())) for kn in EXPORT_KNOBS}
    torch.save(dict(state={k: v.detach().cpu() for k, v in model.state_dict().items()},
                    hessians={k: v.cpu() for k, v in hessians.items()}, model=dataclasses.asdict(model.cfg),
                    train_seq_len=hp.train_seq_len, code_bytes=code_bytes, meta=meta, export=export), buf)
    write_atomic(path, buf.getvalue(), overwrite=False)


def load_prequant(path: str) -> dict:
    """A PREQUANT_SAVE file (PREQUANT_FIELDS; model as a ModelConfig)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        missing = [f for f in PREQUANT_FIELDS if f not in saved]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        return saved | dict(model=saved_model_config(saved["model"], path))
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: prequant file not found") from None
    except Exception as e:
        raise UserError(f"{path}: not a PREQUANT_SAVE file ({type(e).__name__}: {str(e)[:80]})") from None


def check_new_files(hp: Hyperparameters, knobs=("PREQUANT_SAVE", "DUMP_TOKEN_NLL")) -> str | None:
    """Why this run could not write the files these knobs name (a folder not writable, a file that exists: none
    is ever overwritten), or None."""
    for knob in knobs:
        path = getattr(hp, knob.lower())
        if not path:
            continue
        try:
            check_writable(Path(path).parent, f"{knob}'s folder")
        except UserError as e:
            return str(e)
        if Path(path).exists():
            return f"env {knob}={path}: the file exists; it is never overwritten"
    return None


def check_outputs(hp: Hyperparameters, run_id: str) -> str | None:
    """Why this run could not write its artifact (under either name) or its other files (check_new_files), or None."""
    try:
        check_writable(Path(hp.artifact_dir), "ARTIFACT_DIR")
    except UserError as e:
        return str(e)
    if problem := check_new_files(hp):
        return problem
    for path in (artifact_path(hp, run_id), artifact_path(hp, run_id, over_limit=True)):
        if path.exists():
            return f"artifact {path} already exists: it is never overwritten (choose another RUN_ID or ARTIFACT_DIR)"
    return None


def train_and_score(hp: Hyperparameters, dctx: Dist, log, code: bytes, run_id: str) -> dict:
    problem = check_outputs(hp, run_id) if dctx.is_main else None  # before any compute is spent
    problem = dctx.broadcast_object(problem)  # every rank stops, not only the one that looked
    if problem:
        raise UserError(problem)
    evaluator, tokenizer_sha = load_evaluator(hp, dctx, log, hp.vocab_size)
    attn_name, attention = select_attention(hp.attn_backend, dctx.device)
    log(f"attention:{attn_name}")
    train_files = shard_files(hp.data_path, "train")
    log(f"train_shards:{len(train_files)}")
    model, trainer = build_model(hp, dctx, attention, log)
    # before the compile warm-up (a measured reserve compiles only the calibration forward): a refusal comes first
    cap = train_clock_cap(hp, dctx, trainer, train_files)
    log(cap.line())
    prime_s = prime_eval(model, hp.train_seq_len, dctx, hp, log)
    result = train(hp, dctx, trainer, train_files, evaluator, cap.ms, log)
    if dctx.device.type == "cuda":
        log(f"peak_mem_allocated_mib:{torch.cuda.max_memory_allocated() >> 20} "
            f"peak_mem_reserved_mib:{torch.cuda.max_memory_reserved() >> 20}")
    artifact, figures = export(hp, dctx, trainer, train_files, result, cap.reserve_s, code, run_id, tokenizer_sha, log)
    # Before the cap check, so that a run whose artifact is over the cap still reports its model.
    prequant = evaluator.quick(model, hp.train_seq_len, looped=True) if hp.ema_decay else result["val"]
    log(f"prequant val_loss:{prequant[0]:.8f} val_bpb:{prequant[1]:.8f}")
    if figures["artifact_bytes"] > ARTIFACT_LIMIT_BYTES:
        raise UserError(f"artifact {figures['artifact_bytes']} bytes (model {figures['model_bytes']} + code "
                        f"{figures['code_bytes']}) > limit {ARTIFACT_LIMIT_BYTES}: raise MATRIX_CLIP_SIGMAS (now "
                        f"{hp.matrix_clip_sigmas}) or MUON_WD; kept as {artifact}")
    dctx.barrier()
    t0 = time.perf_counter()
    qstate, meta = read_artifact(artifact)  # every phase scores the model reloaded from the file
    reloaded, load_s = reloaded_model(qstate, meta, artifact, dctx, attention, log, time.perf_counter() - t0)
    scores = evaluator.score(reloaded, meta["train_seq_len"], load_s,
                             [] if figures["train_data_in_budget"] else ["training_over_budget"])
    return scores | figures | dict(prequant_val_bpb=prequant[1], quant_gap_bpb=scores["roundtrip_val_bpb"] - prequant[1],
                                   steps=result["steps"], train_seconds=result["train_ms"] / 1000,
                                   warmup_seconds=result["warmup_s"], eval_prime_seconds=prime_s,
                                   stop_reason=result["stop_reason"])


def reloaded_model(qstate: dict, meta: dict, path: Path, dctx: Dist, attention, log,
                   read_s: float) -> tuple[GPT, float]:
    """The model of an artifact read in read_s seconds, running `attention`, and the seconds of reading and
    dequantizing, logged: they come after training, so they are evaluation time."""
    t0 = time.perf_counter()
    model = artifact_model(qstate, meta, path, dctx.device, attention)
    secs = dctx.all_reduce_max(read_s + time.perf_counter() - t0)
    log(f"artifact_load time:{secs:.1f}s")
    return model, secs


# Knobs an EVAL_ONLY run does not read: they shape training and the artifact's export.
EVAL_ONLY_UNREAD = ({k.name for k in SCHEDULE_KNOBS + OPTIMIZER_KNOBS + EXPORT_KNOBS}
                    - {"VAL_MAX_TOKENS", "TRAIN_SEQ_LEN"}) | {"ARTIFACT_DIR", "PREQUANT_SAVE"}


def score_only(hp: Hyperparameters, dctx: Dist, log, code: bytes) -> dict:
    """EVAL_ONLY: score an existing artifact; its model config (and vocab) come from the artifact."""
    problem = dctx.broadcast_object(check_new_files(hp, ("DUMP_TOKEN_NLL",)) if dctx.is_main else None)
    if problem:
        raise UserError(problem)
    path, t0 = Path(hp.eval_only), time.perf_counter()
    qstate, meta = read_artifact(path)
    read_s, seq_len = time.perf_counter() - t0, artifact_train_seq_len(meta, path)
    # its model config checked (artifact_model's rules) before the val data is read for it
    trained = dataclasses.asdict(saved_model_config(meta.get("model", {}), f"artifact {path}")) | dict(
        train_seq_len=seq_len)  # the roundtrip's window, as its training run scored
    evaluator, tokenizer_sha = load_evaluator(hp, dctx, log, trained["vocab_size"],
                                              vocab_owner=f"the vocab of artifact {path}")
    check_artifact_tokenizer(meta, path, tokenizer_sha, hp.tokenizer_path)
    for k in hp.explicit:  # model knobs cannot change a trained model: say so rather than ignore them silently
        if k.lower() in trained and trained[k.lower()] != getattr(hp, k.lower()):
            log(f"warning:env {k}={getattr(hp, k.lower())} ignored: EVAL_ONLY scores the artifact's {k}={trained[k.lower()]}")
    unread = [k for k in hp.explicit if k in EVAL_ONLY_UNREAD]  # nor can what acts before an artifact is written
    if unread:
        log(f"warning:env_ignored_by_eval_only knobs:{','.join(unread)} (they act in training and export; a "
            "re-export: bench/eval_sweep.py PREQUANT=)")
    if "tokenizer_sha256" not in meta:
        log("warning:artifact_records_no_tokenizer (written before artifacts did): make sure TOKENIZER_PATH is the one "
            "it was trained with")
    attn_name, attention = select_attention(hp.attn_backend, dctx.device)
    log(f"attention:{attn_name}")
    model, load_s = reloaded_model(qstate, meta, path, dctx, attention, log, read_s)
    prime_s = prime_eval(model, seq_len, dctx, hp, log)  # as a training run does before its clock
    size, code_bytes = path.stat().st_size, writer_code_bytes(meta, len(code), log)
    under_cap = size + code_bytes <= ARTIFACT_LIMIT_BYTES  # a training run refuses to write it; scored here, never valid
    if not under_cap:
        log(f"warning:artifact_over_limit artifact_bytes:{size + code_bytes} limit:{ARTIFACT_LIMIT_BYTES}: final_valid:0")
    broken = [] if under_cap else ["artifact_over_limit"]
    trained_in_budget = meta.get("train_data_in_budget")
    if type(trained_in_budget) is not int or trained_in_budget not in (0, 1):
        log("warning:artifact_records_no_training_budget (written before artifacts did): final_valid:0")
        broken.append("training_budget_unrecorded")
    elif not trained_in_budget:
        log("warning:artifact_trained_outside_budget (its run read training data past its budget): final_valid:0")
        broken.append("training_over_budget")
    scores = evaluator.score(model, seq_len, load_s, broken)
    return scores | dict(model_bytes=size, code_bytes=code_bytes, artifact_bytes=size + code_bytes,
                         eval_prime_seconds=prime_s)


def writer_code_bytes(meta: dict, own: int, log) -> int:
    """The code bytes an artifact counts: those of the code that wrote it (the one that trains and scores in a
    submission, e.g. the packed file, while the readable one scores here), else this file's (older artifacts)."""
    recorded = meta.get("code_bytes")
    if type(recorded) is not int or recorded < 1:
        log(f"warning:artifact_records_no_code_bytes (written before artifacts did): this file's {own} counted")
        return own
    log(f"code_bytes_counted:{recorded} (the code that wrote the artifact) this_file_bytes:{own}")
    return recorded


def run(hp: Hyperparameters) -> dict:
    t_start = time.perf_counter()
    dctx = setup_distributed(hp)
    torch.manual_seed(hp.seed)
    np.random.seed(hp.seed)
    code = Path(__file__).read_bytes()
    run_id = dctx.broadcast_object(hp.run_id or f"{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}_seed{hp.seed}")
    log = RunLog(log_path(hp.log_dir, run_id), dctx)
    for w in hp.warnings:  # first, where they are seen
        log(f"warning:{w}")
    for line in describe_environment(hp, dctx, code):
        log(line)
    log(f"run_id:{run_id}")
    cache_loaded = False
    try:
        cache_loaded = load_compile_cache(hp.compile_cache, log)
        summary = score_only(hp, dctx, log, code) if hp.eval_only else train_and_score(hp, dctx, log, code, run_id)
        if dctx.is_main and hp.compile_cache:
            save_compile_cache(hp.compile_cache, cache_loaded, log)
        summary["total_seconds"] = time.perf_counter() - t_start
        for k, v in summary.items():
            log(f"{k}:{v:.8f}" if isinstance(v, float) else f"{k}:{v}")
        for w in hp.warnings:  # and again in the final block
            log(f"warning:{w}")
        dctx.barrier()  # no rank tears the group down while another still uses it
        if dctx.enabled:
            dist.destroy_process_group()
        return summary
    except BaseException as e:  # the log keeps what happened; main() prints it and exits non-zero
        if isinstance(e, Interrupted) and dctx.is_main and hp.compile_cache and not cache_loaded:
            # a run stopped by a time limit still leaves what it compiled to the next; a second signal stops the
            # save, not the error line
            with contextlib.suppress(BaseException):
                save_compile_cache(hp.compile_cache, False, log)
        log.error(f"error:{e}" if isinstance(e, UserError) else f"error:{type(e).__name__}: {e}")
        raise


USAGE = """usage: [torchrun --standalone --nproc_per_node=N] train_gpt.py [--help | --help-env]

Trains, quantizes and scores a model; configured by environment variables only (--help-env prints the table
below alone, as README.md holds it):
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help", "--help-env"):
        print(knob_reference() if argv[0] == "--help-env" else USAGE + "\n" + knob_reference())
        return 0
    if argv:
        print(f"error: unknown argument {argv[0]!r}: train_gpt.py is configured by environment variables "
              "(--help lists them)", file=sys.stderr)
        return 2

    def interrupt(signum, _frame):
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    code = 0
    try:
        run(Hyperparameters())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    if os.environ.get("WORLD_SIZE", "1") != "1":
        # The run is complete and its files are written; gloo (torch 2.13) intermittently aborts
        # in its thread teardown at interpreter exit, which would turn success into SIGABRT.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# -----------------------------------------------------------------------------------------
# Fast paths
# Custom kernels behind the model's math: the XSA op and the attention kernels the model can be
# given, each tested against its reference (xsa_reference, causal_attention) in tests/test_model.py.
# -----------------------------------------------------------------------------------------

# XSA as the custom op train_gpt::xsa with a written-out backward: on CUDA one Triton kernel each way
# reads y (and the gradient) once, where autograd of the formula took five kernels and an autograd.Function
# four (results/2026-11-30_xsa_kernel_h200/).

def xsa_backward_reference(grad: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # out_g = y_g - c_g v with c_g = (y_g.v) r, r = 1/(v.v); with a_g = (grad_g.v) r:
    # d y_g = grad_g - a_g v;  d v = -sum_g (a_g y_g + c_g grad_g) + 2 (sum_g a_g c_g) v
    # (the last term is the derivative of r, zero where v.v was clamped).
    vf = _wide(v)
    n2, r, (c, a) = _xsa_dots(y, vf, grad)
    G = y.size(-2)
    dy = torch.stack([_wide(grad[..., g, :]) - a[g] * vf for g in range(G)], dim=-2)
    dv = -sum(a[g] * _wide(y[..., g, :]) + c[g] * _wide(grad[..., g, :]) for g in range(G))
    dv = dv + 2 * (n2 > XSA_EPS) * sum(a[g] * c[g] for g in range(G)) * vf
    return dy.to(y.dtype), dv.to(v.dtype)


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: XSA runs the torch formula
    triton = None

if triton is not None:
    @triton.jit
    def _xsa_rows(V, n_rows, v_token_stride, HKV: tl.constexpr, HD: tl.constexpr, BLOCK: tl.constexpr,
                  EPS: tl.constexpr):
        """This program's BLOCK rows (one row = one (token, KV head)): their indices, the live mask,
        the head-dim offsets, v in float32, v.v and 1/max(v.v, EPS)."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = rows[:, None] < n_rows
        d = tl.arange(0, HD)[None, :]
        v = tl.load(V + (rows // HKV)[:, None] * v_token_stride + (rows % HKV)[:, None] * HD + d,
                    mask=live, other=0.0).to(tl.float32)
        n2 = tl.sum(v * v, axis=1)
        return rows, live, d, v, n2, 1.0 / tl.maximum(n2, EPS)

    @triton.jit
    def _xsa_fwd_kernel(Y, V, O, n_rows, v_token_stride, HKV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr,
                        BLOCK: tl.constexpr, EPS: tl.constexpr):
        rows, live, d, v, n2, r = _xsa_rows(V, n_rows, v_token_stride, HKV, HD, BLOCK, EPS)
        for g in tl.static_range(G):
            at = (rows[:, None] * G + g) * HD + d
            y = tl.load(Y + at, mask=live, other=0.0).to(tl.float32)
            c = tl.sum(y * v, axis=1) * r
            tl.store(O + at, (y - c[:, None] * v).to(O.dtype.element_ty), mask=live)

    @triton.jit
    def _xsa_bwd_kernel(GR, Y, V, DY, DV, n_rows, v_token_stride, HKV: tl.constexpr, G: tl.constexpr,
                        HD: tl.constexpr, BLOCK: tl.constexpr, EPS: tl.constexpr):
        rows, live, d, v, n2, r = _xsa_rows(V, n_rows, v_token_stride, HKV, HD, BLOCK, EPS)
        dv = tl.zeros((BLOCK, HD), dtype=tl.float32)
        ac = tl.zeros((BLOCK,), dtype=tl.float32)
        for g in tl.static_range(G):
            at = (rows[:, None] * G + g) * HD + d
            y = tl.load(Y + at, mask=live, other=0.0).to(tl.float32)
            gr = tl.load(GR + at, mask=live, other=0.0).to(tl.float32)
            c = tl.sum(y * v, axis=1) * r
            a = tl.sum(gr * v, axis=1) * r
            tl.store(DY + at, (gr - a[:, None] * v).to(DY.dtype.element_ty), mask=live)
            dv += a[:, None] * y + c[:, None] * gr
            ac += a * c
        dv = 2.0 * tl.where(n2 > EPS, ac, 0.0)[:, None] * v - dv
        tl.store(DV + rows[:, None] * HD + d, dv.to(DV.dtype.element_ty), mask=live)


XSA_BLOCK_ROWS = 32


def _xsa_kernel_args(y: torch.Tensor, v: torch.Tensor):
    """(y contiguous, v with its head_dim and head strides packed, v's per-token stride, grid, consts),
    or None where the torch formula runs instead (CPU, no Triton, float64, other layouts)."""
    B, T, Hkv, G, hd = y.shape
    if triton is None or not y.is_cuda or y.dtype == torch.float64 or hd & (hd - 1):
        return None
    if not (v.stride(-1) == 1 and v.stride(-2) == hd and v.stride(0) == T * v.stride(1)):
        v = v.contiguous()
    rows = B * T * Hkv
    return (y.contiguous(), v, v.stride(1), (triton.cdiv(rows, XSA_BLOCK_ROWS),),
            dict(HKV=Hkv, G=G, HD=hd, BLOCK=XSA_BLOCK_ROWS, EPS=XSA_EPS), rows)


@torch.library.custom_op("train_gpt::xsa", mutates_args=())
def xsa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA of y [B,T,Hkv,G,hd] against v [B,T,Hkv,hd] (see above); differentiable in y and v."""
    args = _xsa_kernel_args(y, v)
    if args is None:
        return xsa_reference(y, v)
    yc, vc, v_stride, grid, consts, rows = args
    out = torch.empty_like(yc)
    _xsa_fwd_kernel[grid](yc, vc, out, rows, v_stride, **consts)
    return out


@xsa.register_fake
def _(y, v):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


@torch.library.custom_op("train_gpt::xsa_backward", mutates_args=())
def xsa_backward(grad: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    args = _xsa_kernel_args(y, v)
    if args is None:
        return xsa_backward_reference(grad, y, v)
    yc, vc, v_stride, grid, consts, rows = args
    dy, dv = torch.empty_like(yc), torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _xsa_bwd_kernel[grid](grad.contiguous(), yc, vc, dy, dv, rows, v_stride, **consts)
    return dy, dv


@xsa_backward.register_fake
def _(grad, y, v):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device), torch.empty(v.shape, dtype=v.dtype, device=v.device)


xsa.register_autograd(lambda ctx, grad: xsa_backward(grad, *ctx.saved_tensors),
                      setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


# Attention kernels: each takes q [B,T,H,hd] and k, v [B,T,Hkv,hd] (GQA) and returns causal attention
# [B,T,H,hd]. cuDNN is pinned with sdpa_kernel() around the call: torch.compile records that in the graph,
# so a graph cached on disk under another kernel is not reused (global backend flags are not in the
# cache key). Math stays allowed as the fallback for shapes cuDNN rejects.

FLASH_KERNELS = {"fa4": "flash-attention 4 (flash_attn.cute)", "fa3": "flash-attention 3 (flash_attn_interface)"}


def cudnn_attention(fallback: bool = True):
    """causal_attention pinned to SDPA's cuDNN kernel (plus math if fallback)."""
    SDPBackend = torch.nn.attention.SDPBackend
    if fallback:
        return pinned_attention(SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
    return pinned_attention(SDPBackend.CUDNN_ATTENTION)


def flash_attention(name: str):
    """Causal attention of FlashAttention 4 (fa4) or 3 (fa3); None when the package is missing."""
    try:
        if name == "fa4":
            return fa4_attention()
        from flash_attn_interface import flash_attn_func
    except ImportError:
        return None

    def attend(q, k, v):
        out = flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the LSE
    return attend


# FlashAttention 4 (flash-attn-4, CuTe DSL) as a custom op with its own backward, so torch.compile keeps
# it in one graph (FA4's autograd Function is not traceable). Its forward/backward entry points are a
# private API, checked against 4.0.0b36 (torch 2.11's own FA4 hook for SDPA does not match that release).

@torch.library.custom_op("train_gpt::fa4_causal", mutates_args=())
def fa4_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B,T,H,hd], lse [B,H,T] float32) of causal attention; K/V may have fewer heads (GQA)."""
    from flash_attn.cute import interface as fa4
    out, lse = fa4._flash_attn_fwd(q, k, v, causal=True, return_lse=True)[:2]
    return out, lse


@fa4_causal.register_fake
def _(q, k, v):
    B, T, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("train_gpt::fa4_causal_backward", mutates_args=())
def fa4_causal_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute import interface as fa4
    dq, dk, dv = fa4._flash_attn_bwd(q, k, v, out, dout, lse, causal=True)[:3]
    return dq, dk, dv


@fa4_causal_backward.register_fake
def _(dout, q, k, v, out, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


fa4_causal.register_autograd(lambda ctx, dout, _dlse: fa4_causal_backward(dout.contiguous(), *ctx.saved_tensors),
                             setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs, *output))


def fa4_attention():
    """attend() over fa4_causal; ImportError when flash-attn-4 is missing."""
    import flash_attn.cute.interface  # noqa: F401
    return lambda q, k, v: fa4_causal(q.contiguous(), k.contiguous(), v.contiguous())[0]


def select_attention(choice: str, device: torch.device) -> tuple[str, object]:
    """(name, attention function) for ATTN_BACKEND: a named kernel as asked (an error if it cannot load);
    `auto` on CUDA the first of FA4, FA3 and cuDNN SDPA that imports and runs a small call; on CPU, SDPA."""
    if choice in FLASH_KERNELS:
        try:
            attend = flash_attention(choice) if device.type == "cuda" else None
        except Exception as e:  # an installed but broken package (CUDA toolkit flavour, driver, JIT)
            raise UserError(f"env ATTN_BACKEND={choice}: {FLASH_KERNELS[choice]} failed to load: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}") from e
        if attend is None:
            raise UserError(f"env ATTN_BACKEND={choice}: {FLASH_KERNELS[choice]} is not importable on "
                            f"{device.type} (use auto or sdpa)")
        return choice, attend
    if choice == "sdpa_cudnn":
        return choice, cudnn_attention()
    if choice == "sdpa" or device.type != "cuda":
        return "sdpa", causal_attention
    for name in ("fa4", "fa3"):
        if (attend := runs_on(device, lambda: flash_attention(name))) is not None:
            return name, attend
    return "sdpa_cudnn", cudnn_attention()


def runs_on(device: torch.device, make):
    """make()'s attention if it imports and runs one small causal call on `device`, else None: optional
    packages fail in their own ways (a missing CUDA toolkit flavour at import, a JIT error at first call)."""
    try:
        attend = make()
        if attend is not None:
            q = torch.randn(1, 128, 2, 64, device=device, dtype=torch.bfloat16)
            attend(q, q[:, :, :1], q[:, :, :1])
        return attend
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
