"""The control tasks of the generalist, their scripted experts, and episodes played by a policy.

Every task gives, per step, continuous observation values (mu-law tokens), discrete observation
values (integer tokens) and one discrete action. The experts are written here, not learned:
  cartpole   CartPole-v1: push toward where the pole falls, a linear rule on the pole angle and
             angular velocity with small cart terms (500, the maximum, in every episode)
  acrobot    Acrobot-v1: torque with the second joint's angular velocity, which pumps energy
             into the swing until the tip clears the bar
  minigrid   MiniGrid-FourRooms-v0: a breadth-first search over (cell, heading) on the full grid
             gives the shortest turn/forward sequence to the goal; the agent sees only its 7x7
             egocentric view, one discrete token per cell (object, colour, state) and its heading
A random policy (uniform over the action space, seeded) gives the low end of the expert-normalised
score (agent - random) / (expert - random) that the paper reports.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib
import json
from typing import Callable

import numpy as np

from core import cli
from core.config import check_choice

Policy = Callable[[object, object], int]  # (observation, env) -> action


@dataclasses.dataclass(frozen=True)
class ControlTask:
    name: str
    env_id: str
    continuous: int          # continuous observation values per step
    discrete: int            # discrete observation values per step
    actions: int             # size of the discrete action space
    observe: Callable        # observation -> (continuous [continuous], discrete [discrete])
    expert: Policy

    def make(self):
        import gymnasium as gym
        if self.env_id.startswith("MiniGrid"):
            importlib.import_module("minigrid")  # registers the MiniGrid environments
        return gym.make(self.env_id)


def _cartpole_expert(obs, env) -> int:
    x, x_dot, theta, theta_dot = obs
    return int(10.0 * theta + 2.0 * theta_dot + 0.1 * x + 0.5 * x_dot > 0)


def _acrobot_expert(obs, env) -> int:
    return 2 if obs[5] > 0 else 0  # +1 torque with the second joint's swing, else -1


def _vector(obs) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(obs, np.float32), np.zeros(0, np.int64)


def _grid_view(obs) -> tuple[np.ndarray, np.ndarray]:
    """The 7x7 view as one value per cell, object + 11 (colour + 6 state) < 198, then heading."""
    view = obs["image"].astype(np.int64)
    cells = view[..., 0] + 11 * (view[..., 1] + 6 * view[..., 2])
    return np.zeros(0, np.float32), np.concatenate([cells.reshape(-1), [198 + obs["direction"]]])


def _shortest_path_expert(obs, env) -> int:
    """The first action of a shortest path to the goal: left 0, right 1, forward 2."""
    from minigrid.core.constants import DIR_TO_VEC
    grid = env.unwrapped
    goal = next((x, y) for x in range(grid.width) for y in range(grid.height)
                if (c := grid.grid.get(x, y)) is not None and c.type == "goal")
    start = (*grid.agent_pos, grid.agent_dir)
    came_from = {start: None}
    frontier = collections.deque([start])
    while frontier:
        state = frontier.popleft()
        if state[:2] == goal:
            break
        x, y, d = state
        dx, dy = DIR_TO_VEC[d]
        moves = [((x, y, (d - 1) % 4), 0), ((x, y, (d + 1) % 4), 1)]
        ahead = grid.grid.get(x + dx, y + dy)
        if ahead is None or ahead.can_overlap():
            moves.append(((x + dx, y + dy, d), 2))
        for nxt, action in moves:
            if nxt not in came_from:
                came_from[nxt] = (state, action)
                frontier.append(nxt)
    else:
        raise RuntimeError(f"no path to the goal in {env.spec.id}")
    while came_from[state][0] != start:
        state = came_from[state][0]
    return came_from[state][1]


TASKS = {t.name: t for t in (
    ControlTask("cartpole", "CartPole-v1", 4, 0, 2, _vector, _cartpole_expert),
    ControlTask("acrobot", "Acrobot-v1", 6, 0, 3, _vector, _acrobot_expert),
    ControlTask("minigrid", "MiniGrid-FourRooms-v0", 0, 50, 7, _grid_view,
                _shortest_path_expert),
)}


def task(name: str) -> ControlTask:
    check_choice("control task", name, TASKS)
    return TASKS[name]


def random_policy(seed: int) -> Policy:
    rng = np.random.default_rng(seed)
    return lambda obs, env: int(rng.integers(env.action_space.n))


@dataclasses.dataclass
class Episode:
    continuous: np.ndarray   # [steps, task.continuous] float32
    discrete: np.ndarray     # [steps, task.discrete] int64
    actions: np.ndarray      # [steps] int64
    ret: float               # the sum of rewards


def play(control: ControlTask, policy: Policy, seed: int, env=None) -> Episode:
    """One episode from reset(seed): every observation, the action taken on it, the return."""
    env = env or control.make()
    obs, _ = env.reset(seed=seed)
    cont, disc, actions, ret, done = [], [], [], 0.0, False
    while not done:
        c, d = control.observe(obs)
        action = policy(obs, env)
        cont.append(c)
        disc.append(d)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        ret += float(reward)
        done = terminated or truncated
    return Episode(np.stack(cont).astype(np.float32), np.stack(disc).astype(np.int64),
                   np.asarray(actions, np.int64), ret)


def returns(control: ControlTask, policy: Policy, episodes: int = 100,
            seed: int = 0) -> np.ndarray:
    """The return of each of `episodes` episodes, reset seeds from `seed`, on one environment."""
    env = control.make()
    return np.array([play(control, policy, seed + i, env).ret for i in range(episodes)])


def standard_error(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def mean_return(control: ControlTask, policy: Policy, episodes: int = 100,
                seed: int = 0) -> tuple[float, float]:
    """(mean, standard error) of the return over `episodes` seeds from `seed`."""
    got = returns(control, policy, episodes, seed)
    return float(got.mean()), standard_error(got)


def main(argv=None) -> None:
    """`python -m multimodal.environments`: each task's expert and random returns."""
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="the first reset seed")
    args = parser.parse_args(argv)
    out = {}
    for name, control in TASKS.items():
        expert = mean_return(control, control.expert, args.episodes, args.seed)
        chance = mean_return(control, random_policy(args.seed), args.episodes, args.seed)
        out[name] = {"env": control.env_id, "episodes": args.episodes,
                     "expert": expert[0], "expert_stderr": expert[1],
                     "random": chance[0], "random_stderr": chance[1]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    cli.main_entry(main)
