"""Run a few optimizer steps under the current (torchrun) world and dump losses + weights.

usage: [torchrun --nproc_per_node=N] python tests/dist_worker.py OUT.pt   (config from env)
       (tests/forkserver.py runs it too: main() in a forked process, --nproc N ranks)
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def main(argv: list[str]) -> int:
    hp = train_gpt.Hyperparameters()
    dctx = train_gpt.setup_distributed(hp)
    torch.manual_seed(hp.seed)
    model = train_gpt.GPT(hp.model_config())
    trainer = train_gpt.Trainer(hp, dctx, model)
    trainer.reset_stream(train_gpt.shard_files(hp.data_path, "train"))
    clipped = []
    real_mul = torch._foreach_mul_

    def spy_mul(tensors, scale):  # record whether gradient clipping actually scaled anything
        clipped.append(float(scale) < 1.0)
        return real_mul(tensors, scale)

    torch._foreach_mul_ = spy_mul
    try:
        losses = [trainer.step(s, 1.0, hp.train_seq_len, False).item() for s in range(hp.iterations)]
    finally:
        torch._foreach_mul_ = real_mul
    if dctx.is_main:
        torch.save(dict(losses=losses, accum=trainer.plans[hp.train_seq_len][1], state=model.state_dict(),
                        clipped=any(clipped)), argv[0])
    if dctx.enabled:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # as train_gpt.main: skip gloo's flaky thread teardown at interpreter exit
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
