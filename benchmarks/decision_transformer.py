"""Benchmark: return conditioning of a tiny Decision Transformer on the learnability bandit (not a test).

    python benchmarks/decision_transformer.py                 # 5 training seeds, ~5 s
    python benchmarks/decision_transformer.py --seeds 1 --steps 100 200

Trains our DecisionTransformer (1 layer, d_model 16, 2 heads, float32, one thread) exactly as
properties/test_decision_transformer.py's learnability test does (2000 behaviour episodes of the spec's
3-step contextual bandit, Adam lr 1e-2, batches of 64, ``--steps`` steps), then plays 1000 new episodes
conditioned on each target return R_0 = 0 .. 3 (spec.conditioned_rollout: R_{i+1} = R_i - r_i) and prints,
per target, the mean achieved return and the share of steps on the paying arm, next to the behaviour
policy's (the data's) mean return. A return-conditioned model tracks the target: the achieved return rises
with R_0, and at R_0 = 3 (the best return, 0.3^3 = 2.7% of the episodes in expectation) it exceeds the
data's mean return (0.9) by far. Also printed: ms per training step and per conditioned episode (three forward passes).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

import implementations  # noqa: E402
from properties.plugin import Implementation  # noqa: E402
from properties.test_decision_transformer import BANDIT_SEED, greedy_arms, train_on_bandit  # noqa: E402
from spec import decision_transformer as spec  # noqa: E402

TEST_EPISODES = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[100])
    parser.add_argument("--seeds", type=int, default=5, help="training seeds (weights, data, batches) per row")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours = Implementation("ours", implementations)
    _, _, data_rewards = spec.bandit_episodes(2000, np.random.default_rng(BANDIT_SEED))
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), float32; "
          f"behaviour policy: mean return {data_rewards.sum(1).mean():.2f} of {spec.HORIZON}, "
          f"paying arm {data_rewards.mean():.2f} of steps, best return in {(data_rewards.sum(1) == 3).mean():.1%} "
          f"of the episodes")
    targets = range(spec.HORIZON + 1)
    header = " steps | " + " | ".join(f"R_0={r}: return, paying" for r in targets) + " | ms/train step | ms/episode"
    print(header)
    print("-" * len(header))
    for steps in args.steps:
        achieved = np.zeros((args.seeds, len(targets), 2))
        train_ms, play_ms = [], []
        for k in range(args.seeds):
            seed = BANDIT_SEED + k
            model = ours.build("DecisionTransformer", seed=seed, dtype=torch.float32, state_dim=spec.CONTEXTS,
                               act_dim=spec.CONTEXTS, d_model=16, n_layer=1, n_head=2, max_timestep=spec.HORIZON)
            start = time.perf_counter()
            train_on_bandit(model, steps=steps, seed=seed)
            train_ms.append((time.perf_counter() - start) / steps * 1e3)
            contexts, _, _ = spec.bandit_episodes(TEST_EPISODES, np.random.default_rng(seed + 1))
            for r in targets:
                start = time.perf_counter()
                arms, rewards = spec.conditioned_rollout(greedy_arms(model), contexts, target_return=r)
                play_ms.append((time.perf_counter() - start) / TEST_EPISODES * 1e3)
                achieved[k, r] = rewards.sum(1).mean(), (arms == spec.optimal_arm(contexts)).mean()
        mean = achieved.mean(0)
        width = len("R_0=0: return, paying")
        cells = " | ".join(f"{mean[r, 0]:6.2f}, {mean[r, 1]:.2f}".rjust(width) for r in targets)
        print(f"{steps:6d} | {cells} | {np.median(train_ms):13.2f} | {np.median(play_ms):10.3f}")
    print(f"(means over {args.seeds} training seeds, {TEST_EPISODES} episodes per target)")


if __name__ == "__main__":
    main()
