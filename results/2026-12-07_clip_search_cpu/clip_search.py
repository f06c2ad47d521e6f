"""The clip search far under the cap, on CPU: a tiny model trained 60 steps on the test corpus (PREQUANT_SAVE),
its GPTQ'd banks' output error sum tr(E H E^T) against the matrix clip, and the clip quantize_within_budget
returns for CLIP_SEARCH_STEPS 4, 8, 12 (every try fits: the model is ~0.7 MB). Run from the repository root:
python3 results/2026-12-07_clip_search_cpu/clip_search.py (~1 min; scratch in /tmp/clip_search)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import train_gpt  # noqa: E402

TMP = Path("/tmp/clip_search")
TINY = dict(VOCAB_SIZE=1024, NUM_LAYERS=4, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, TRAIN_SEQ_LEN=64,
            TRAIN_BATCH_TOKENS=4096, ITERATIONS=60, WARMUP_STEPS=1, VAL_MAX_TOKENS=4096, MAX_WALLCLOCK_SECONDS=0,
            XSA_LAST_N=4, NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, PARALLEL_RESIDUAL_START=3, ROPE_DIMS=8,
            EVAL_SEQ_LEN=64, EVAL_STRIDE=0, TTT_ENABLED=0, GPTQ_CALIBRATION_BATCHES=4, CLIP_SEARCH_STEPS=0)


def trained() -> dict:
    path = TMP / "prequant.pt"
    if not path.exists():
        data = TMP / "data"
        subprocess.run([sys.executable, "data/tokenize_jsonl.py", "tests/fixtures/corpus.jsonl.xz", "--out-dir",
                        str(data), "--name", "tiny", "--vocab-size", "1024", "--val-docs", "12"], cwd=ROOT, check=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(train_gpt.KNOB_PREFIXES)}
        env |= {k: str(v) for k, v in TINY.items()} | dict(
            DATA_PATH=str(data / "datasets" / "tiny"), TOKENIZER_PATH=str(data / "tokenizers" / "tiny_bpe.model"),
            LOG_DIR=str(TMP / "logs"), ARTIFACT_DIR=str(TMP / "art"), DEVICE="cpu", RUN_ID="clip_search",
            PREQUANT_SAVE=str(path))
        subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, env=env, check=True, capture_output=True)
    return train_gpt.load_prequant(str(path))


def main():
    torch.set_num_threads(1)
    saved = trained()
    state, hess, cfg = saved["state"], saved["hessians"], saved["model"]
    hp = train_gpt.Hyperparameters({"LQER_TOP_K": "0"})
    for k in (12.35, 10.74, 9.34, 8.12, 7.06, 6.14, 5.34, 4.64, 4.04, 3.51, 3.05, 2.65, 2.31, 2.0):
        q = train_gpt.quantize_state(state, hess, cfg.num_layers, hp.matrix_bits, k, hp.embed_bits,
                                     hp.embed_clip_sigmas)
        print(f"clip:{k:.2f} output_error:{train_gpt.output_error(state, q, hess, cfg.num_layers):.4f}")
    for steps in (4, 8, 12):
        lines = []
        hp = train_gpt.Hyperparameters({"CLIP_SEARCH_STEPS": str(steps), "LQER_TOP_K": "0"})
        blob, k = train_gpt.quantize_within_budget(state, hess, cfg, hp, saved["code_bytes"], lines.append)
        tried = [line.split()[1].split(":")[1] for line in lines if line.startswith("gptq_try")]
        print(f"CLIP_SEARCH_STEPS={steps}: tries:{len(tried)} clips:{','.join(tried)} returned:{k:.4f} "
              f"artifact_bytes:{len(blob) + saved['code_bytes']}")


if __name__ == "__main__":
    main()
