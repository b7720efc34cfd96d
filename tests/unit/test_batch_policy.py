"""The batching policies against a simulated clock: a fake cost model, arrival processes (Poisson,
bursts, one client in a loop) and one model worker, event by event, with no threads and no sleeps."""
import bisect
import random
from collections import deque
from dataclasses import dataclass, field
from statistics import mean
from typing import Callable, List, Optional

import pytest

from app.batcher import AdaptiveWindow, BatchPolicy, FixedWindow, ForwardCosts

Cost = Callable[[int], float]


def linear_cost(fixed_s: float, per_image_s: float) -> Cost:
    return lambda n: fixed_s + per_image_s * n


CPU_LIKE = linear_cost(0.0015, 0.0022)  # the shipped model on 2 AVX2 cores: little to gain per batch
SHIPPED_LIKE = linear_cost(0.0008, 0.0003)  # the shipped model on an AVX-512 core: 1 ms at batch 1, 3 ms at 8
GPU_LIKE = linear_cost(0.008, 0.0002)  # a forward costs about the same for 1 or 32 images
WARMUP_SIZES = (1, 2, 4, 8, 16, 32)


def adaptive(cost: Cost, max_batch_size: int = 32, max_wait_s: float = 0.005) -> AdaptiveWindow:
    return AdaptiveWindow(max_batch_size, max_wait_s, ForwardCosts({n: cost(n) for n in WARMUP_SIZES}))


@dataclass
class Request:
    announced: float  # arrival: the request starts decoding (the batcher's ``expect``)
    queued: float  # decoded and submitted
    started: Optional[float] = None  # its batch's forward began
    answered: Optional[float] = None


@dataclass
class Simulation:
    """One model worker serving single-image requests; each takes ``decode_s`` between arriving
    (announced) and being queued. Open arrivals are given as times; a closed loop of ``clients``
    sends each client's next request ``think_s`` after its answer."""

    policy: BatchPolicy
    cost: Cost
    decode_s: float = 0.001
    think_s: float = 0.0005
    wake_s: float = 0.0  # how late a worker resumes after a wait (in the service: it takes the GIL back)
    answered: List[Request] = field(default_factory=list)
    batches: List[int] = field(default_factory=list)

    def run_open(self, arrivals: List[float]) -> "Simulation":
        self._serve([Request(t, t + self.decode_s) for t in sorted(arrivals)], closed=False, until=float("inf"))
        return self

    def run_closed(self, clients: int, seconds: float) -> "Simulation":
        self._serve([Request(i * 1e-4, i * 1e-4 + self.decode_s) for i in range(clients)], closed=True, until=seconds)
        return self

    def _serve(self, pending: List[Request], closed: bool, until: float) -> None:
        """``pending`` (sorted by queued time, from ``head`` on) are not queued yet; ``ready`` are."""
        times, head, ready, now = [r.queued for r in pending], 0, deque(), 0.0

        def advance(to: float) -> None:
            nonlocal head, now
            now = to
            while head < len(pending) and pending[head].queued <= now:
                at = pending[head].queued
                ready.append(pending[head])
                head += 1
                self.policy.arrived(1, at, bisect.bisect_right(times, at + self.decode_s, lo=head) - head)

        while (ready or head < len(pending)) and now < until:
            advance(now if ready else max(now, pending[head].queued))
            batch, first = [ready.popleft()], now
            while len(batch) < self.policy.batch_size():
                if ready:
                    batch.append(ready.popleft())
                    continue
                arriving = bisect.bisect_right(times, now + self.decode_s, lo=head) - head  # announced, not queued
                wait = self.policy.wait_s(len(batch), arriving, now - first)
                if wait <= 0:
                    break
                advance(min(now + wait, times[head] if head < len(times) else float("inf")))
                if self.wake_s:
                    advance(now + self.wake_s)
                    self.policy.woke(self.wake_s)
            seconds = self.cost(len(batch))
            for r in batch:
                r.started, r.answered = now, now + seconds
                if closed:
                    nxt = Request(r.answered + self.think_s, r.answered + self.think_s + self.decode_s)
                    at = bisect.bisect_right(times, nxt.queued, lo=head)
                    times.insert(at, nxt.queued)
                    pending.insert(at, nxt)
            self.answered.extend(batch)
            self.batches.append(len(batch))
            self.policy.computed(len(batch), seconds)
            now += seconds

    @property
    def mean_latency(self) -> float:
        return mean(r.answered - r.announced for r in self.answered)

    @property
    def queue_waits(self) -> List[float]:
        return [r.started - r.queued for r in self.answered]


def poisson(rate: float, seconds: float, seed: int = 0) -> List[float]:
    rng, t, times = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t > seconds:
            return times
        times.append(t)


def bursts(count: int, size: int, every_s: float, spread_s: float, seed: int = 0) -> List[float]:
    rng = random.Random(seed)
    return [b * every_s + rng.uniform(0, spread_s) for b in range(count) for _ in range(size)]


@pytest.mark.parametrize("cost", [CPU_LIKE, GPU_LIKE], ids=["cpu-like", "gpu-like"])
def test_one_client_in_a_loop_is_never_held_for_company(cost: Cost) -> None:
    sim = Simulation(adaptive(cost), cost).run_closed(clients=1, seconds=2.0)
    assert len(sim.answered) > 100
    assert max(sim.queue_waits) == 0 and set(sim.batches) == {1}


def assert_adaptive_within_5_percent_of_the_better_window(cost: Cost, arrivals: List[float], **simulation) -> None:
    """The adaptive window's mean latency over ``arrivals`` is within 5% of the better of no window
    and the fixed 5 ms window; ``simulation``: more ``Simulation`` fields."""
    latency = {name: Simulation(policy, cost, **simulation).run_open(arrivals).mean_latency for name, policy in {
        "adaptive": adaptive(cost), "no window": FixedWindow(32, 0.0), "5 ms": FixedWindow(32, 0.005)}.items()}
    assert latency["adaptive"] <= 1.05 * min(latency["no window"], latency["5 ms"]), latency


@pytest.mark.parametrize("cost", [CPU_LIKE, GPU_LIKE], ids=["cpu-like", "gpu-like"])
@pytest.mark.parametrize("load", [0.3, 0.6, 0.9])
def test_poisson_arrivals_wait_no_longer_than_pays(cost: Cost, load: float) -> None:
    """At a share of the model's peak rate, the adaptive window's mean latency is within 5% of the
    better of no window and the fixed 5 ms window, whichever that is for the model."""
    assert_adaptive_within_5_percent_of_the_better_window(cost, poisson(load * 32 / cost(32), 3.0, seed=int(load * 10)))


def test_a_model_that_batches_cheaply_waits_for_a_burst_on_its_way() -> None:
    """Also when each wait's wake-up is late, as in the service (0.3 ms median measured on 2 cores)."""
    sim = Simulation(adaptive(GPU_LIKE), GPU_LIKE, decode_s=0.002, wake_s=0.0005).run_open(
        bursts(count=20, size=16, every_s=0.05, spread_s=0.001))
    assert mean(sim.batches) >= 12
    assert max(sim.queue_waits) <= 0.005 + 1e-9  # never past the window


def test_a_model_that_gains_little_from_batching_does_not_wait_for_a_burst() -> None:
    sim = Simulation(adaptive(CPU_LIKE), CPU_LIKE, decode_s=0.002).run_open(
        bursts(count=20, size=16, every_s=0.1, spread_s=0.001))
    fixed = Simulation(FixedWindow(32, 0.005), CPU_LIKE, decode_s=0.002).run_open(
        bursts(count=20, size=16, every_s=0.1, spread_s=0.001))
    assert sim.mean_latency < fixed.mean_latency


def plateau_after_8(n: int) -> float:
    """Images/s grows up to batch 8 and falls beyond it (activations leave the caches)."""
    return 0.004 + 0.001 * n if n <= 8 else (0.004 + 0.008) / 8 * n * 1.1


def test_batches_stop_at_the_size_where_images_per_second_stops_growing() -> None:
    policy = adaptive(plateau_after_8)
    assert policy.batch_size() == 8
    sim = Simulation(policy, plateau_after_8).run_closed(clients=64, seconds=1.0)
    # and one in EXPLORE_EVERY + 1 of twice that size, which measures the larger size again
    assert sim.batches.count(8) >= AdaptiveWindow.EXPLORE_EVERY * sim.batches.count(16) > 0
    assert set(sim.batches) == {4, 8, 16} and sim.batches.count(4) == 1  # the first, before the rest arrived


def test_the_batch_size_follows_the_costs_it_measures_while_serving() -> None:
    """Seeded as if batching gained nothing, serving a model that gains from it: the served
    batches' costs move the limit up, one size at a time as the larger batches are measured."""
    policy = AdaptiveWindow(32, 0.005, ForwardCosts({n: 0.003 * n for n in WARMUP_SIZES}))
    assert policy.batch_size() == 1
    for _ in range(30):
        for n in WARMUP_SIZES:
            policy.computed(n, GPU_LIKE(n))
    assert policy.batch_size() == 32


def test_batches_grow_past_a_limit_that_a_slow_warm_up_set() -> None:
    """The warm-up timed every size above 4 twice as slow as it is (another replica warming up on
    the same cores): served, the larger sizes are measured again now and then and the limit grows."""
    seed = {n: SHIPPED_LIKE(n) * (2 if n > 4 else 1) for n in WARMUP_SIZES}
    policy = AdaptiveWindow(32, 0.005, ForwardCosts(seed))
    assert policy.batch_size() == 4
    sim = Simulation(policy, SHIPPED_LIKE).run_closed(clients=64, seconds=2.0)
    assert policy.batch_size() >= 16 and mean(sim.batches[-100:]) > 12


def test_forward_costs_interpolate_between_and_scale_beyond_what_was_measured() -> None:
    costs = ForwardCosts({2: 0.004, 4: 0.008})
    assert costs.seconds(3) == pytest.approx(0.006)
    assert costs.seconds(1) == pytest.approx(0.004)  # below the smallest: its cost, never less
    assert costs.seconds(8) == pytest.approx(0.016)
    costs.observe(2, 0.014)
    assert costs.seconds(2) == pytest.approx(0.004 + ForwardCosts.SMOOTHING * 0.010)


def test_without_measured_costs_the_adaptive_window_is_the_fixed_one() -> None:
    policy = AdaptiveWindow(16, 0.005, ForwardCosts())
    assert policy.batch_size() == 16
    assert policy.wait_s(1, arriving=3, waited_s=0.001) == pytest.approx(0.004)
    assert policy.wait_s(1, arriving=0, waited_s=0.0) == 0


@pytest.mark.parametrize("setting, expected",
                         [(None, AdaptiveWindow), ("fixed", FixedWindow), ("adaptive", AdaptiveWindow)])
def test_the_service_takes_the_adaptive_window_unless_told_fixed(setting, expected) -> None:
    from app.config import Settings
    from app.service import Service

    service = Service(Settings(**({"batch_policy": setting} if setting else {})))
    try:
        assert type(service._policy(ForwardCosts({1: 0.01}))) is expected
    finally:
        service.preprocess_pool.shutdown()


@pytest.mark.parametrize("load, wake_s", [(0.3, 0.001), (0.6, 0.002)])
def test_a_wait_prices_the_late_wake_up_it_measured(load: float, wake_s: float) -> None:
    """Waiting workers resume late (in the service: they take the GIL back from a busy event loop),
    and images are announced shortly before they are queued. Unpriced, a wake-up of 1-2 ms made the
    adaptive window 13% and 10% slower than no window here; priced, it is within 5% of the better
    of no window and the fixed 5 ms window."""
    assert_adaptive_within_5_percent_of_the_better_window(
        SHIPPED_LIKE, poisson(load * 32 / SHIPPED_LIKE(32), seconds=3.0, seed=6), decode_s=0.0003, wake_s=wake_s)
