"""The continuous batching engine in-process: rows joining and leaving a running batch get the same
tokens (and the same logit bits) as alone, on a tiny random model that rarely stops by itself."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from conftest import save_tiny_pt, save_tiny_tokenizer
from ernie_paddle import ErniePredictor, cpu_ops
from ernie_paddle.engine import Engine, QueueFull, Request, SamplingParams

TEXTS = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)]
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine") / "tiny-PT"
    save_tiny_pt(directory, vocab_size=400)
    save_tiny_tokenizer(directory, TEXTS, vocab_size=400)
    return ErniePredictor.from_pretrained(directory, device="cpu", dtype="float32", progress=False)


def jobs(count: int, seed: int = 0, longest_prompt: int = 20, most_tokens: int = 40):
    rnd = random.Random(seed)
    return [([rnd.randrange(3, 400) for _ in range(rnd.randrange(1, longest_prompt))], rnd.randrange(1, most_tokens))
            for _ in range(count)]


class Collector:
    """A request's outputs, gathered on the engine's thread."""

    def __init__(self):
        self.outputs, self.finished = [], threading.Event()

    def __call__(self, out):
        self.outputs.append(out)
        if out.finish_reason or out.error:
            self.finished.set()

    def tokens(self):
        return [t for o in self.outputs for t in o.tokens]

    def logprobs(self):
        return [lp.logprob for o in self.outputs for lp in o.logprobs]


def run(engine, work, params=SamplingParams, spread_s: float = 0.03, seed: int = 1):
    """Submit every (prompt, max_tokens) of `work` at random moments within `spread_s` each; wait."""
    rnd = random.Random(seed)
    collectors = []
    for ids, max_tokens in work:
        collectors.append(Collector())
        engine.submit(Request(ids, params(max_tokens=max_tokens, logprobs=0), collectors[-1]))
        time.sleep(rnd.random() * spread_s)
    for c in collectors:
        assert c.finished.wait(TIMEOUT_S)
    return collectors


@pytest.fixture
def engine_factory(predictor):
    engines = []

    def make(start=True, **kwargs):
        engine = Engine(predictor.model, predictor.tokenizer, **kwargs)
        if start:
            engine.start()
            engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(0)
        engine.join(TIMEOUT_S)
        assert not engine.thread.is_alive()


def stepped(engine, work, seed: int = 1):
    """Run every (prompt, max_tokens) of `work` on `engine` step by step on this thread, each submitted
    before a step drawn at random (seeded: the same joins, leaves and moves every run)."""
    rnd = random.Random(seed)
    arrivals = sorted(rnd.randrange(3 * len(work)) for _ in work)
    collectors, step = [Collector() for _ in work], 0
    while not all(c.finished.is_set() for c in collectors):
        for (ids, max_tokens), collector, arrival in zip(work, collectors, arrivals):
            if arrival == step:
                engine.submit(Request(ids, SamplingParams(max_tokens=max_tokens, logprobs=0), collector))
        engine.step()
        step += 1
    return collectors


@pytest.mark.parametrize("max_model_len", [64, 512])
def test_rows_joining_and_leaving_get_the_tokens_and_bits_they_get_alone(predictor, engine_factory, max_model_len):
    """Against ErniePredictor.generate on each prompt alone; with a 64-token slot the keys are also
    moved down (compacted) and up (a long prompt joining) on the way."""
    work = jobs(24)
    engine, shifts = engine_factory(start=False, max_num_seqs=4, max_model_len=max_model_len), []
    shift = engine._shift
    engine._shift = lambda by: (shifts.append(by), shift(by))
    batched = stepped(engine, work)
    assert max_model_len > 64 or (min(shifts) < 0 < max(shifts))
    alone_engine = engine_factory(start=False, max_num_seqs=1, max_model_len=max_model_len)
    for (ids, max_tokens), got in zip(work, batched):
        [expected] = predictor.generate([ids], max_new_tokens=max_tokens)
        assert got.tokens() == expected.token_ids
        assert got.outputs[-1].finish_reason == expected.finish_reason
        # One at a time, a request's keys sit where generate puts them: the logits' bits must agree.
        [alone] = stepped(alone_engine, [(ids, max_tokens)])
        assert got.logprobs() == alone.logprobs()


def test_a_request_arriving_mid_step_gets_its_first_token_in_that_step_and_the_tokens_of_generate(
        predictor, engine_factory):
    """Requests submitted between two decoder layers of a decode step (by the test, before the engine's
    between_layers) are prefilled within that step when a slot is free, then decode as they do alone (the
    same logit bits as one at a time)."""
    work = jobs(16, seed=6, most_tokens=20)
    engine = engine_factory(start=False, max_num_seqs=4, max_model_len=64)
    layers = predictor.model.ernie.layers
    rnd = random.Random(7)
    arrivals = sorted((rnd.randrange(4 * len(work)), rnd.randrange(len(layers)), i) for i in range(len(work)))
    collectors = [Collector() for _ in work]
    step, in_slot, mid_step = 0, [], 0  # the requests submitted mid-step while a slot was free

    def submit_due(layer_index):
        while arrivals and arrivals[0][:2] <= (step, layer_index):
            i = arrivals.pop(0)[2]
            ids, max_tokens = work[i]
            if len(engine.running) + len(engine.joining) < engine.slots and layer_index < len(layers):
                in_slot.append(i)
            engine.submit(Request(ids, SamplingParams(max_tokens=max_tokens, logprobs=0), collectors[i]))

    engine_between_layers, before = engine._prefill_between_layers, [0]  # the layer about to run

    def between_layers():  # the model calls it before each layer of a decode step: the test's, then the engine's
        submit_due(before[0])
        before[0] += 1
        engine_between_layers()

    engine._prefill_between_layers = between_layers
    while not all(c.finished.is_set() for c in collectors):
        in_slot.clear()
        before[0] = 0
        engine.step()
        assert all(collectors[i].outputs for i in in_slot)
        mid_step += len(in_slot)
        submit_due(len(layers))  # those due in a step without a decode (no running request)
        step += 1
    assert mid_step >= 8
    alone_engine = engine_factory(start=False, max_num_seqs=1, max_model_len=64)
    for (ids, max_tokens), got in zip(work, collectors):
        assert got.tokens() == predictor.generate([ids], max_new_tokens=max_tokens)[0].token_ids
        [alone] = stepped(alone_engine, [(ids, max_tokens)])
        assert got.logprobs() == alone.logprobs()


def test_a_step_runs_a_layer_at_a_time_only_while_a_slot_is_free(predictor, engine_factory, monkeypatch):
    """A decode step passes between_layers (the CPU decoder then runs one operator call for each quarter
    of the layers, so that an arrival can be prefilled between two) only while a slot is free; with every slot taken nothing
    can join, and the step runs as one call."""
    model = predictor.model
    forward, steps = model.forward, []

    def recording(*args, between_layers=None, **kwargs):
        if args[4] > 0:  # a decode step (start > 0), not a prefill
            steps.append(between_layers is not None)
        return forward(*args, between_layers=between_layers, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    engine = engine_factory(start=False, max_num_seqs=2, max_model_len=64)
    collectors = [Collector(), Collector()]
    for ids, collector in zip(([5, 6, 7], [8, 9]), collectors):
        engine.submit(Request(ids, SamplingParams(max_tokens=4), collector))
    while not all(c.finished.is_set() for c in collectors):
        engine.step()
    assert steps[:3] == [False, False, False]  # both slots taken
    engine.submit(Request([5, 6, 7], SamplingParams(max_tokens=3), Collector()))
    steps.clear()
    engine.step()
    engine.step()
    assert steps == [True, True]  # one request of two slots


def test_the_engine_thread_gives_the_tokens_of_generate(predictor, engine_factory):
    """Requests arriving at random moments while the engine's own thread runs."""
    work = jobs(10, seed=2)
    for (ids, max_tokens), got in zip(work, run(engine_factory(max_num_seqs=4, max_model_len=64), work)):
        assert got.tokens() == predictor.generate([ids], max_new_tokens=max_tokens)[0].token_ids


def test_paddle_ops_without_the_cpu_kernels_give_the_same_tokens(predictor, engine_factory, monkeypatch):
    """Paddle's own attention reads the whole cache: the mask must hide every other row there too."""
    monkeypatch.setattr(cpu_ops, "available", lambda: False)
    work = jobs(10, seed=3)
    for (ids, max_tokens), got in zip(work, stepped(engine_factory(start=False, max_num_seqs=4, max_model_len=64),
                                                    work)):
        assert got.tokens() == predictor.generate([ids], max_new_tokens=max_tokens)[0].token_ids


STRIDES_OFF = """
import json, random, sys
from ernie_paddle import ErniePredictor
from ernie_paddle.engine import Engine, Request, SamplingParams
p = ErniePredictor.from_pretrained(sys.argv[1], device="cpu", dtype="float32", progress=False)
engine, outputs = Engine(p.model, p.tokenizer, max_num_seqs=4, max_model_len=64), []
work = json.loads(sys.argv[2])
for i, (ids, max_tokens) in enumerate(work):
    tokens = []
    outputs.append(tokens)
    engine.submit(Request(ids, SamplingParams(max_tokens=max_tokens), lambda out, t=tokens: t.extend(out.tokens)))
    engine.step()
while engine.running or engine.waiting:
    engine.step()
print(json.dumps(outputs))
"""


def test_rows_share_the_pool_with_strided_views_off(predictor):
    """With FLAGS_use_stride_kernel=0 (read when paddle is imported; custom devices and the NPU
    images set it) a slice of a tensor is a copy: each step's keys must still reach the pool."""
    work = jobs(8, seed=4)
    child = subprocess.run([sys.executable, "-c", STRIDES_OFF, str(predictor.directory), json.dumps(work)],
                           env={**os.environ, "FLAGS_use_stride_kernel": "0"}, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    assert child.returncode == 0, child.stderr[-2000:]
    for (ids, max_tokens), got in zip(work, json.loads(child.stdout.splitlines()[-1])):
        assert got == predictor.generate([ids], max_new_tokens=max_tokens)[0].token_ids


def test_seeded_sampling_does_not_depend_on_the_other_rows(predictor, engine_factory):
    def sampled(**kw):
        return SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=11, **kw)

    engine = engine_factory(max_num_seqs=4, max_model_len=128)
    ids = [5, 17, 33, 2, 90]
    [alone] = run(engine, [(ids, 30)], sampled)
    crowd = run(engine, [(ids, 30)] + jobs(6, seed=5), sampled)
    assert crowd[0].tokens() == alone.tokens()
    [other_seed] = run(engine, [(ids, 30)], lambda **kw: SamplingParams(temperature=1.0, seed=12, **kw))
    assert other_seed.tokens() != alone.tokens()


def test_a_cancelled_request_leaves_at_the_next_step(predictor, engine_factory):
    engine = engine_factory(start=False, max_num_seqs=2, max_model_len=512)
    cancelled, other = Collector(), Collector()
    request = Request([5, 6, 7], SamplingParams(max_tokens=500, logit_bias={2: -100}), cancelled)
    engine.submit(request)
    engine.submit(Request([8, 9], SamplingParams(max_tokens=500, logit_bias={2: -100}), other))
    for _ in range(3):
        engine.step()
    seen, others = len(cancelled.outputs), len(other.outputs)
    assert engine.batch_size == 2
    engine.cancel(request)
    engine.step()
    assert len(cancelled.outputs) == seen and len(other.outputs) == others + 1 and engine.batch_size == 1
    assert not cancelled.finished.is_set()


def test_timeout_queue_bound_and_shutdown(predictor, engine_factory, monkeypatch):
    forward = predictor.model.forward

    def slow_forward(*args, **kwargs):  # 500 steps then outlast the 0.2 s timeout and the 0.1 s grace on any machine
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(predictor.model, "forward", slow_forward)
    engine = engine_factory(max_num_seqs=1, max_model_len=512, max_queue=1)
    timed_out = Collector()
    engine.submit(Request([5, 6], SamplingParams(max_tokens=500, logit_bias={2: -100}), timed_out, timeout=0.2))
    assert timed_out.finished.wait(TIMEOUT_S)
    assert "timed out" in timed_out.outputs[-1].error and len(timed_out.tokens()) < 500

    running, waiting = Collector(), Collector()
    engine.submit(Request([5, 6], SamplingParams(max_tokens=500, logit_bias={2: -100}), running))
    while not running.outputs:
        time.sleep(0.001)
    engine.submit(Request([7], SamplingParams(max_tokens=5), waiting))
    with pytest.raises(QueueFull):
        engine.submit(Request([8], SamplingParams(max_tokens=5), Collector()))
    engine.shutdown(grace=0.1)
    assert waiting.finished.wait(TIMEOUT_S) and "shutting down" in waiting.outputs[-1].error
    assert running.finished.wait(TIMEOUT_S) and "shutting down" in running.outputs[-1].error
    engine.join(TIMEOUT_S)
    assert not engine.thread.is_alive()
