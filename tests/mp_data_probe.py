"""A member of a process group for tests/test_multiprocess.py (started by python -m t2i_jax.launch):
joins the group as train.py does, reads the tiny config's training batches with the iterator's
default slice (jax.process_index() of jax.process_count()), assembles each global batch with
sharding.global_batch as the training loop does, and writes OUT/process_<I>.json: this process's
record indices per step and the assembled global batch's.

    python tests/mp_data_probe.py OUT DATA_DIR GLOBAL_BATCH STEPS --coordinator_address ... \\
        --num_processes N --process_id I
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    from t2i_jax import distributed
    p = argparse.ArgumentParser()
    for name in ("out", "data_dir"):
        p.add_argument(name)
    p.add_argument("global_batch", type=int)
    p.add_argument("steps", type=int)
    distributed.add_arguments(p)
    args = p.parse_args()
    distributed.join(distributed.from_args(args))
    import jax
    from runs import tiny
    from t2i_jax import data as data_lib, sharding as mesh_lib
    cfg = tiny(args.data_dir)
    it = data_lib.make_train_iterator(cfg.data, seed=cfg.seed, global_batch_size=args.global_batch,
                                      max_length=32)
    mesh = mesh_lib.make_mesh(1)
    local, assembled = [], []
    for _ in range(args.steps):
        batch = next(it)
        local.append([int(i) for i in batch["index"]])
        g = mesh_lib.global_batch({"index": batch["index"].astype("int32")}, mesh)["index"]
        assembled.append([int(i) for i in distributed.to_host(g)])
    with open(os.path.join(args.out, f"process_{jax.process_index()}.json"), "w") as f:
        json.dump(dict(process=jax.process_index(), count=jax.process_count(),
                       devices=jax.device_count(), local=local, assembled=assembled), f)


if __name__ == "__main__":
    main()
