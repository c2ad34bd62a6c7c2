"""
Training fingerprints: did a code change alter what sb3_trpo_ext learns?

A speed-up that reproduces the same arithmetic leaves every weight bit-identical, so the returns campaign needs no
re-run. This command trains ``sb3_trpo_ext.TRPO`` with the RL Zoo's settings for a few updates per environment and
records a SHA-256 of the policy's weights and of the ``VecNormalize`` statistics, with the commit that produced them.
Two result files of the same machine with equal hashes mean the two commits trained identically there (the hashes
are not comparable across machines: BLAS kernels differ).

Usage::

    python -m benchmarks.fingerprint --name before        # writes benchmarks/results/fingerprints/before.json
    python -m benchmarks.fingerprint --compare benchmarks/results/fingerprints/before.json
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.vec_env import VecNormalize

from benchmarks.common import RESULTS_DIR, make_model, make_train_env, read_json, timestamp, versions, write_json, zoo_config

ENVS = ("CartPole-v1", "Pendulum-v1", "HalfCheetah-v5", "Hopper-v5")
DEFAULT_OUT = RESULTS_DIR / "fingerprints"


def fingerprint(env_id: str, timesteps: int, seed: int) -> str:
    """
    :param env_id: the environment.
    :param timesteps: training budget.
    :param seed: seed of the model and of the environments.
    :return: the SHA-256 of the trained policy's weights (and normalisation statistics), in hex.
    """
    th.set_num_threads(1)
    config = zoo_config(env_id)
    env = make_train_env(config, seed=seed)
    model = make_model("sb3_trpo_ext", config, env, seed=seed)
    model.learn(timesteps)
    digest = hashlib.sha256()
    for name, tensor in model.policy.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    if isinstance(env, VecNormalize):
        for array in (env.obs_rms.mean, env.obs_rms.var, env.ret_rms.mean, env.ret_rms.var):  # type: ignore[union-attr,attr-defined]
            digest.update(np.asarray(array, dtype=np.float64).tobytes())
    env.close()
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--envs", nargs="+", default=None, help=f"environment ids (default: {' '.join(ENVS)}; with --compare, the file's)"
    )
    parser.add_argument(
        "--timesteps", type=int, default=None, help="training steps per environment (default 8192; with --compare, the file's)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed (default 3; with --compare, the file's)")
    parser.add_argument("--name", default=None, help="result file name (default: UTC time and git commit)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="a fingerprint file to compare with, at its timesteps and seed (nothing written); --envs: some of its envs",
    )
    args = parser.parse_args(argv)

    reference: dict[str, Any] | None = None
    if args.compare is not None:
        reference = read_json(args.compare)
        if reference is None:
            parser.error(f"--compare: no fingerprint file at {args.compare}")
        if not (
            isinstance(reference, dict)
            and isinstance(reference.get("hashes"), dict)
            and isinstance(reference.get("timesteps"), int)
            and isinstance(reference.get("seed"), int)
        ):
            parser.error(f"--compare: {args.compare} is not a fingerprint file (no 'hashes', 'timesteps' and 'seed')")
        for option, value in (("timesteps", args.timesteps), ("seed", args.seed)):
            if value is not None and value != reference[option]:
                parser.error(f"--{option} {value}: {args.compare} was made with {reference[option]} (leave it out)")
        missing = [env_id for env_id in args.envs or [] if env_id not in reference["hashes"]]
        if missing:
            parser.error(
                f"--envs: {args.compare} has no hash for {', '.join(missing)} (it has {', '.join(reference['hashes'])})"
            )
        args.envs = args.envs or list(reference["hashes"])
        args.timesteps, args.seed = reference["timesteps"], reference["seed"]
        reference["hashes"] = {env_id: reference["hashes"][env_id] for env_id in args.envs}
    else:
        args.envs = args.envs or list(ENVS)
        args.timesteps = 8192 if args.timesteps is None else args.timesteps
        args.seed = 3 if args.seed is None else args.seed
    hashes = {}
    for env_id in args.envs:
        hashes[env_id] = fingerprint(env_id, args.timesteps, args.seed)
        same = "" if reference is None else ("  identical" if reference["hashes"][env_id] == hashes[env_id] else "  DIFFERENT")
        print(f"{env_id:16s} {hashes[env_id][:16]}{same}", flush=True)
    if reference is not None:
        return 0 if hashes == reference["hashes"] else 1
    meta = versions()
    name = args.name or f"{timestamp().replace(':', '')}-{meta.get('git_commit') or 'nogit'}"
    path = args.out / f"{name}.json"
    write_json(
        path, {"created": timestamp(), "timesteps": args.timesteps, "seed": args.seed, "hashes": hashes, "versions": meta}
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
