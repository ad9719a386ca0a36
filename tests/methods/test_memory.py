"""The rehearsal memory: herding against a brute-force greedy, budgets, class balance, reservoir, replay batches."""

import pytest
import torch

from dataloaders.image_set import ImageSet
from experiment.checkpoint import load_checkpoint, task_checkpoint_path
from experiment.config import ConfigError
from incremental_train_and_eval import run
from methods.memory import RehearsalMemory, herding_order


def images(labels, seed=0):
    """uint8 images (N, 1, 4, 4) whose first pixel is the sample's index (to recognise them) and their labels."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (len(labels), 1, 4, 4), generator=g, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(len(labels), dtype=torch.uint8)
    return ImageSet(x, labels)


def brute_force_herding(features, m):
    """iCaRL Alg. 4 written plainly: one candidate at a time."""
    f = torch.nn.functional.normalize(features, dim=1)
    mu = f.mean(0)
    chosen = []
    for k in range(1, m + 1):
        best, best_dist = None, float("inf")
        for j in range(len(f)):
            if j in chosen:
                continue
            dist = (mu - (f[chosen].sum(0) + f[j]) / k).norm().item()
            if dist < best_dist:
                best, best_dist = j, dist
        chosen.append(best)
    return chosen


def test_herding_matches_brute_force_greedy():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(15, 6, generator=g).abs() + 0.1 * torch.randn(15, 6, generator=g)
    assert herding_order(features, 7).tolist() == brute_force_herding(features, 7)
    full = herding_order(features, 40)  # more than available: every sample once
    assert sorted(full.tolist()) == list(range(15))


def test_herding_first_pick_is_the_sample_closest_to_the_mean():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.1]])
    # normalised mean points along (1, 1): sample 2 is exactly on it
    assert herding_order(features, 1).tolist() == [2]


def test_fixed_total_memory_is_class_balanced_and_shrinks_to_a_prefix():
    memory = RehearsalMemory(memory_size=10, per_class=None, selection="random", device="cpu")
    g = torch.Generator().manual_seed(0)
    memory.update(images([0] * 8 + [1] * 8), n_seen=2, generator=g)
    assert memory.class_counts(2).tolist() == [5, 5]
    first_of_class0 = memory.x[memory.y == 0][:2].clone()
    memory.update(images([2] * 6 + [3] * 6 + [4] * 1, seed=1), n_seen=5, generator=g)
    assert memory.class_counts(5).tolist() == [2, 2, 2, 2, 1]  # class 4 has a single image: kept
    assert len(memory) <= memory.budget(5) == 10
    assert torch.equal(memory.x[memory.y == 0], first_of_class0)  # shrinking keeps each class's first exemplars


def test_fixed_per_class_memory_grows_with_the_classes():
    memory = RehearsalMemory(memory_size=5, per_class=3, selection="random", device="cpu")
    g = torch.Generator().manual_seed(0)
    memory.update(images([0] * 5 + [1] * 5), n_seen=2, generator=g)
    memory.update(images([2] * 5 + [3] * 5), n_seen=4, generator=g)
    assert memory.class_counts(4).tolist() == [3, 3, 3, 3] and memory.budget(4) == 12


def test_herding_memory_stores_each_class_in_herding_order():
    data = images([0] * 6 + [1] * 6)
    features = torch.randn(12, 5, generator=torch.Generator().manual_seed(1))
    memory = RehearsalMemory(memory_size=8, per_class=None, selection="herding", device="cpu")
    memory.update(data, n_seen=2, generator=torch.Generator(), features=features)
    for c in (0, 1):
        idx = torch.nonzero(data.y == c).flatten()
        expected = data.x[idx[herding_order(features[idx], 4)]]
        assert torch.equal(memory.x[memory.y == c], expected)
    with pytest.raises(ValueError, match="herding needs features"):
        memory.update(images([2] * 3), n_seen=3, generator=torch.Generator())


def test_random_selection_is_seeded_by_the_generator():
    picks = []
    for _ in range(2):
        memory = RehearsalMemory(memory_size=4, per_class=None, selection="random", device="cpu")
        memory.update(images([0] * 10 + [1] * 10), n_seen=2, generator=torch.Generator().manual_seed(7))
        picks.append(memory.x[:, 0, 0, 0].tolist())
    assert picks[0] == picks[1] and len(set(picks[0])) == 4


def test_reservoir_respects_its_budget_and_samples_the_stream_uniformly():
    memory = RehearsalMemory(memory_size=7, per_class=None, selection="reservoir", device="cpu")
    g = torch.Generator().manual_seed(0)
    memory.update(images([0] * 5), n_seen=1, generator=g)
    assert len(memory) == 5 and memory.n_stream == 5  # not full yet: everything kept
    memory.update(images([1] * 10), n_seen=2, generator=g)
    assert len(memory) == 7 and memory.n_stream == 15
    # each of the 30 stream items (3 tasks of 10) should end up kept with probability 6 / 30 = 0.2
    kept = torch.zeros(3)
    trials = 400
    for t in range(trials):
        res = RehearsalMemory(memory_size=6, per_class=None, selection="reservoir", device="cpu")
        gen = torch.Generator().manual_seed(t)
        for task in range(3):
            res.update(images([task] * 10), n_seen=task + 1, generator=gen)
        assert len(res) == 6
        kept += res.class_counts(3)
    share = kept / (trials * 10)  # per-item keep rate, by task
    assert torch.allclose(share, torch.full((3,), 0.2), atol=0.03), share
    with pytest.raises(ConfigError, match="memory_per_class"):
        RehearsalMemory(memory_size=10, per_class=2, selection="reservoir", device="cpu")


def test_memory_state_round_trips_and_rejects_float_images():
    memory = RehearsalMemory(memory_size=6, per_class=None, selection="reservoir", device="cpu")
    memory.update(images([0, 0, 1, 1, 1]), n_seen=2, generator=torch.Generator())
    copy = RehearsalMemory(memory_size=6, per_class=None, selection="reservoir", device="cpu")
    copy.load_state_dict(memory.state_dict())
    assert torch.equal(copy.x, memory.x) and torch.equal(copy.y, memory.y) and copy.n_stream == 5
    with pytest.raises(ValueError, match="uint8"):
        memory.update(ImageSet(torch.rand(2, 1, 4, 4), torch.tensor([0, 1])), n_seen=2, generator=torch.Generator())


def _memory_of(data):
    memory = RehearsalMemory(memory_size=len(data), per_class=None, selection="reservoir", device="cpu")
    memory.update(data, n_seen=2, generator=torch.Generator().manual_seed(0))
    return memory


def test_replay_batches_join_or_balance_the_memory(make_cfg):
    train, memory = images([2] * 30 + [3] * 30), images([0] * 10 + [1] * 10, seed=5)
    gen = torch.Generator().manual_seed(0)
    joined = list(_memory_of(memory).loader(train, make_cfg(batch_size=16), gen, "cpu"))
    labels = torch.cat([b.y for b in joined])
    assert len(labels) == 80 and torch.bincount(labels).tolist() == [10, 10, 30, 30]  # one pass over both
    balanced = list(_memory_of(memory).loader(train, make_cfg(batch_size=200, balanced_replay=True), gen, "cpu"))
    syn = torch.cat([b.synthetic for b in balanced])
    y = torch.cat([b.y for b in balanced])
    assert len(y) == 120 and abs(syn.float().mean().item() - 0.5) < 0.15
    assert bool((y[syn] < 2).all()) and bool((y[~syn] >= 2).all())  # memory rows are the flagged ones


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("keys", "quota"),
    [({"memory_size": 30}, lambda n: 30 // n), ({"memory_per_class": 4}, lambda n: 4)],
)
def test_memory_never_exceeds_its_budget_over_a_run(make_cfg, tmp_path, keys, quota):
    # no training (epochs 0): the memory is updated after each of the 3 tasks (4, 3, 3 classes) and checkpointed
    run(make_cfg(method="icarl", epochs=0, nb_cl_fg=4, nb_cl=3, output_dir=str(tmp_path / "r"), **keys))
    for task, n_seen in ((1, 4), (2, 7), (3, 10)):
        state = load_checkpoint(task_checkpoint_path(tmp_path / "r", task))["method"]["memory"]
        counts = torch.bincount(state["y"], minlength=n_seen)
        assert counts.tolist() == [quota(n_seen)] * n_seen
        assert state["x"].dtype == torch.uint8 and len(state["y"]) <= keys.get("memory_size", 4 * n_seen)
