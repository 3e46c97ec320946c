"""The worker against a fake engine (scripted outputs) and a real temporary queue file, arq-style: run in burst mode
and assert on counters and on what the queue holds."""

from __future__ import annotations

import asyncio
import contextlib
import json

from bot.queue import GAVE_UP, JobStatus, NewJob, Queue
from bot.settings import Settings
from bot.worker import NO_USABLE_OUTPUT, Worker, next_seed
from model.engine import GenerationRequest, GenerationResult
from model.format import prompt
from model.tree import Thread

GOOD = "Neat. How big is the GC?<|c|>About 200 lines.<|ec|><|ec|><|c|>Reminds me of SICP.<|ec|>"
EMPTY = "<|ec|>"  # the opened comment closed with no text: nothing usable
SETTINGS = Settings(batch_size=4, token_budget=100_000, max_new_tokens=100, generation_retries=2, max_attempts=3,
                    lease_seconds=60.0, worker_poll_seconds=30.0)



class FakeEngine:
    """Answers each call with the next scripted step: a text (or a function of the request), or an exception."""

    def __init__(self, *script, default=GOOD) -> None:
        self.script = list(script)
        self.default = default
        self.calls: list[list[GenerationRequest]] = []
        self.at_once = self.most_at_once = 0  # requests being generated together

    async def generate(self, requests, on_text=None) -> list[GenerationResult]:
        self.calls.append(list(requests))
        self.at_once += len(requests)
        self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            await self.work(requests)
        finally:
            self.at_once -= len(requests)
        step = self.script.pop(0) if self.script else self.default
        if isinstance(step, BaseException):
            raise step
        texts = [step(r) if callable(step) else step for r in requests]
        return [GenerationResult(text=t, prompt_tokens=len(r.prompt) // 4, new_tokens=len(t) // 4, finished=True)
                for r, t in zip(requests, texts, strict=True)]

    async def work(self, requests) -> None:
        await asyncio.sleep(0.01)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for call in self.calls for r in call]


class HangingEngine:
    """Never returns (a stuck GPU, a worker about to crash)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    async def generate(self, requests, on_text=None):
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class Publisher:
    """The lead's publisher, faked: records the thread and marks the job done."""

    def __init__(self, queue: Queue, fail_for: set[int] = frozenset()) -> None:
        self.queue = queue
        self.fail_for = fail_for
        self.published: list[tuple[int, Thread]] = []
        self.event = asyncio.Event()

    async def __call__(self, job, thread: Thread) -> None:
        if job.id in self.fail_for:
            raise RuntimeError("platform said no")
        self.published.append((job.id, thread))
        await self.queue.mark_done(job.id)
        self.event.set()


def new_job(title: str = "Show HN: A tiny Lisp", requester: str = "u1", **changes) -> NewJob:
    values = dict(platform="console", channel_id="c1", requester_id=requester, input=title, seed=7,
                  temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=100, max_attempts=3, title=title,
                  url="https://example.com/lisp")
    values.update(changes)
    return NewJob(**values)


async def test_burst_generates_and_publishes(queue):
    jobs = [await queue.enqueue(new_job(f"Title {i}")) for i in range(3)]
    engine, publish = FakeEngine(), Publisher(queue)
    worker = Worker(queue, engine, publish, SETTINGS)
    await worker.run_burst()
    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried, worker.claims) == (3, 0, 0, 1)
    assert [len(call) for call in engine.calls] == [1, 1, 1]  # one request per job: the engine batches them
    batch = [request for call in engine.calls for request in call]
    assert [r.prompt for r in batch] == [prompt(f"Title {i}", "https://example.com/lisp") for i in range(3)]
    assert all(r.seed == 7 and r.sampling.temperature == 0.8 and r.sampling.top_p == 0.9 and r.sampling.top_k == 40
               and r.sampling.max_new_tokens == 100 and r.sampling.guidance_scale == SETTINGS.guidance_scale
               for r in batch)
    assert sorted(job_id for job_id, _ in publish.published) == [j.id for j in jobs]
    for job in jobs:
        stored = await queue.get(job.id)
        assert stored.status is JobStatus.DONE and stored.problems == "clean"
        thread = Thread.from_json(stored.result)
        assert (thread.title, thread.url, thread.comment_count) == (job.title, job.url, 3)
        assert thread.comments[0].children[0].text == "About 200 lines."


async def test_unfinished_output_keeps_closed_comments_only(queue):
    await queue.enqueue(new_job())
    cut = "First.<|ec|><|c|>Second, cut off in the mid"

    class Cut(FakeEngine):
        async def generate(self, requests, on_text=None):
            return [GenerationResult(cut, 10, 20, finished=False) for _ in requests]

    publish = Publisher(queue)
    await Worker(queue, Cut(), publish, SETTINGS).run_burst()
    [(_, thread)] = publish.published
    assert [c.text for c in thread.comments] == ["First."]
    assert "cut off" in (await queue.list_jobs())[0].problems


async def test_batch_size_and_token_budget(queue):
    for i in range(5):
        await queue.enqueue(new_job(f"T{i}"))
    engine = FakeEngine()
    worker = Worker(queue, engine, Publisher(queue), SETTINGS.replace(batch_size=2))
    await worker.run_burst()
    assert worker.claims == 3 and engine.most_at_once == 2 and worker.jobs_complete == 5
    for i in range(3):
        await queue.enqueue(new_job(f"U{i}"))
    engine = FakeEngine()
    worker = Worker(queue, engine, Publisher(queue), SETTINGS.replace(token_budget=250))  # ~115 tokens a job
    await worker.run_burst()
    assert worker.claims == 2 and engine.most_at_once == 2 and worker.jobs_complete == 3


async def test_empty_output_is_retried_with_a_new_seed(queue):
    job = await queue.enqueue(new_job(seed=1234))
    engine, publish = FakeEngine(EMPTY, GOOD), Publisher(queue)
    worker = Worker(queue, engine, publish, SETTINGS)
    await worker.run_burst()
    assert engine.seeds == [1234, next_seed(1234)]
    stored = await queue.get(job.id)
    assert (stored.status, stored.seed, stored.generations, stored.attempts) == (
        JobStatus.DONE, next_seed(1234), 1, 0)
    assert (worker.jobs_complete, worker.jobs_retried, worker.claims) == (1, 1, 2)
    assert len(publish.published) == 1


async def test_always_bad_output_fails_with_a_message(queue):
    job = await queue.enqueue(new_job(seed=5))
    events = []

    async def notify(j, event):
        events.append((j.id, event))

    engine = FakeEngine(default=EMPTY)
    worker = Worker(queue, engine, Publisher(queue), SETTINGS, notify=notify)
    await worker.run_burst()
    stored = await queue.get(job.id)
    assert stored.status is JobStatus.FAILED and stored.error == NO_USABLE_OUTPUT
    assert stored.generations == SETTINGS.generation_retries and stored.attempts == 0
    assert engine.seeds == [5, next_seed(5), next_seed(next_seed(5))]
    assert (worker.jobs_failed, worker.jobs_retried, worker.jobs_complete) == (1, 2, 0)
    assert events == [(job.id, "started"), (job.id, "failed")]


async def test_engine_error_releases_the_job_then_completes(queue):
    a, b = await queue.enqueue(new_job("A")), await queue.enqueue(new_job("B"))
    engine, publish = FakeEngine(RuntimeError("CUDA out of memory")), Publisher(queue)
    worker = Worker(queue, engine, publish, SETTINGS)
    await worker.run_burst()
    assert len(engine.calls) == 3 and worker.jobs_retried == 1 and worker.jobs_complete == 2
    for job, attempts in ((a, 1), (b, 0)):
        stored = await queue.get(job.id)
        assert (stored.status, stored.attempts, stored.seed) == (JobStatus.DONE, attempts, 7)


async def test_engine_that_keeps_failing_gives_up(queue):
    job = await queue.enqueue(new_job(max_attempts=2))
    engine = FakeEngine(default=RuntimeError("broken"))
    worker = Worker(queue, engine, Publisher(queue), SETTINGS)
    await worker.run_burst()
    stored = await queue.get(job.id)
    assert stored.status is JobStatus.FAILED and stored.error == GAVE_UP.format(n=2)
    assert len(engine.calls) == 2 and worker.jobs_failed == 1


async def test_one_bad_job_does_not_stop_the_others(queue):
    bad = await queue.enqueue(new_job("bad", top_p=5.0))  # sampling the engine refuses: fails alone
    good = await queue.enqueue(new_job("good"))
    broken = await queue.enqueue(new_job("broken publish"))
    publish = Publisher(queue, fail_for={broken.id})
    worker = Worker(queue, FakeEngine(), publish, SETTINGS)
    await worker.run_burst()
    assert (await queue.get(bad.id)).status is JobStatus.FAILED
    assert (await queue.get(good.id)).status is JobStatus.DONE
    assert (await queue.get(broken.id)).status is JobStatus.POSTING  # left for the publisher's recovery
    assert worker.publish_errors == 1 and worker.jobs_complete == 2 and worker.jobs_failed == 1


async def test_slow_publishing_does_not_stall_the_next_batch(queue):
    first, second = await queue.enqueue(new_job("first")), await queue.enqueue(new_job("second"))
    gate, published = asyncio.Event(), []

    async def slow_publish(job, thread):
        if job.id == first.id:
            await gate.wait()
        published.append(job.id)

    engine = FakeEngine()
    worker = Worker(queue, engine, slow_publish, SETTINGS.replace(batch_size=1))
    burst = asyncio.create_task(worker.run_burst())
    for _ in range(200):
        if worker.jobs_complete == 2:
            break
        await asyncio.sleep(0.01)
    assert worker.jobs_complete == 2 and published == [second.id]  # second batch ran while first was posting
    gate.set()
    await asyncio.wait_for(burst, 5)
    assert published == [second.id, first.id]


async def test_crashed_worker_is_recovered_exactly_once(tmp_path, clock):
    path = tmp_path / "queue.sqlite3"
    q1 = await Queue.open(path, clock=clock)
    job = await q1.enqueue(new_job())
    hanging = HangingEngine()
    publish1 = Publisher(q1)
    crashed = Worker(q1, hanging, publish1, SETTINGS)
    task = asyncio.create_task(crashed.run())
    await asyncio.wait_for(hanging.started.wait(), 5)
    assert (await q1.get(job.id)).status is JobStatus.RUNNING
    task.cancel()  # the process dies mid-batch: nothing is released
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert hanging.cancelled
    await q1.close()

    clock.advance(SETTINGS.lease_seconds + 1)
    q2 = await Queue.open(path, clock=clock)  # a new process on the same file
    try:
        recovered = await q2.get(job.id)
        assert (recovered.status, recovered.attempts) == (JobStatus.QUEUED, 1)
        engine, publish2 = FakeEngine(), Publisher(q2)
        worker = Worker(q2, engine, publish2, SETTINGS)
        await worker.run_burst()
        await worker.run_burst()
        assert worker.jobs_complete == 1 and len(engine.calls) == 1
        assert publish1.published == [] and [j for j, _ in publish2.published] == [job.id]
        done = await q2.get(job.id)
        assert done.status is JobStatus.DONE and done.attempts == 1
    finally:
        await q2.close()


class StreamThenHang:
    """Streams the start of a thread, then never returns: a worker that crashes mid-job after posting comments."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.started = asyncio.Event()

    async def generate(self, requests, on_text=None):
        on_text(0, self.text)
        self.started.set()
        await asyncio.Event().wait()


async def test_a_job_resumed_after_a_crash_keeps_the_comments_it_had_posted(tmp_path, clock):
    """Generating again from the seed need not give the same text (another batch changes the logits' last bits):
    the next claim continues from the text the posted comments came from instead."""
    path = tmp_path / "queue.sqlite3"
    q1 = await Queue.open(path, clock=clock)
    job = await q1.enqueue(new_job())
    before = "Neat. How big is the GC?<|c|>About 200 lines.<|ec|><|ec|><|c|>Reminds me of"
    streamed: list[tuple[tuple[int, ...], str]] = []

    async def stream(_job, where, comment) -> None:
        streamed.append((tuple(where), comment.text))

    crashing = StreamThenHang(before)
    task = asyncio.create_task(Worker(q1, crashing, Publisher(q1), SETTINGS, stream=stream).run())
    await asyncio.wait_for(crashing.started.wait(), 5)
    for _ in range(500):  # the two closed comments are saved, then posted
        if len(streamed) == 2:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    progress = (await q1.get(job.id)).progress
    assert progress == "Neat. How big is the GC?<|c|>About 200 lines.<|ec|><|ec|><|c|>"  # up to the last tag
    assert streamed == [((0,), "Neat. How big is the GC?"), ((0, 0), "About 200 lines.")]
    await q1.close()

    clock.advance(SETTINGS.lease_seconds + 1)
    q2 = await Queue.open(path, clock=clock)
    try:
        # A re-run from scratch would write something else; given what was written, it continues it.
        engine = FakeEngine(default=lambda r: (r.written or "Something else entirely.<|ec|>") + "Lisp in Small "
                                              "Pieces, too.<|ec|>")
        publish = Publisher(q2)
        await Worker(q2, engine, publish, SETTINGS, stream=stream).run_burst()
        assert [r.written for r in engine.calls[0]] == [progress]
        [(_, thread)] = publish.published
        assert [c.text for c in thread.comments] == ["Neat. How big is the GC?", "Lisp in Small Pieces, too."]
        assert thread.comments[0].children[0].text == "About 200 lines."
    finally:
        await q2.close()


async def test_a_worker_that_lost_its_lease_streams_nothing(queue, clock):
    job = await queue.enqueue(new_job())
    go = asyncio.Event()
    streamed = []

    class LateEngine:
        async def generate(self, requests, on_text=None):
            await go.wait()
            on_text(0, GOOD)
            return [GenerationResult(text=GOOD, prompt_tokens=1, new_tokens=1, finished=True)]

    async def stream(_job, where, comment) -> None:
        streamed.append(where)

    worker = Worker(queue, LateEngine(), Publisher(queue), SETTINGS, stream=stream)
    [task] = await worker._claim()
    clock.advance(SETTINGS.lease_seconds + 1)  # stalled past its lease: another worker has the job now
    await queue.requeue_expired()
    await queue.claim("other", limit=1, token_budget=100_000, lease_seconds=60)
    go.set()
    await task
    await worker.drain()
    assert streamed == [] and (await queue.get(job.id)).progress is None


async def test_slow_worker_that_lost_its_lease_does_not_publish_twice(tmp_path, clock):
    path = tmp_path / "queue.sqlite3"
    q1, q2 = await Queue.open(path, clock=clock), await Queue.open(path, clock=clock)
    try:
        job = await q1.enqueue(new_job())
        gate = asyncio.Event()

        class Slow(FakeEngine):
            async def generate(self, requests, on_text=None):
                await gate.wait()
                return await super().generate(requests, on_text)

        publish = Publisher(q1)
        slow = Worker(q1, Slow(), publish, SETTINGS, worker_id="worker-1")
        slow_run = asyncio.create_task(slow.run_burst())
        for _ in range(200):
            if (await q1.get(job.id)).status is JobStatus.RUNNING:
                break
            await asyncio.sleep(0.01)
        clock.advance(SETTINGS.lease_seconds + 1)  # it went quiet: the lease lapses
        fast = Worker(q2, FakeEngine(), publish, SETTINGS, worker_id="worker-1")  # same name, new process
        await fast.run_burst()
        assert fast.jobs_complete == 1
        gate.set()
        await asyncio.wait_for(slow_run, 5)
        assert slow.jobs_complete == 0 and [j for j, _ in publish.published] == [job.id]
    finally:
        await q1.close()
        await q2.close()


async def test_leases_are_kept_alive_while_generating(queue, clock):
    job = await queue.enqueue(new_job())
    settings = SETTINGS.replace(lease_seconds=0.15)
    first_expiry = asyncio.get_running_loop().create_future()
    renewed: list[float] = []

    class Watching(FakeEngine):
        async def generate(self, requests, on_text=None):
            first_expiry.set_result((await queue.get(job.id)).lease_expires_at)
            clock.advance(100)  # the generation takes "long"; without renewal the lease would have lapsed
            for _ in range(200):
                if (await queue.get(job.id)).lease_expires_at > first_expiry.result():
                    renewed.append(clock.now)
                    break
                await asyncio.sleep(0.01)
            return await super().generate(requests, on_text)

    worker = Worker(queue, Watching(), Publisher(queue), settings)
    await worker.run_burst()
    stored = await queue.get(job.id)
    assert renewed and stored.status is JobStatus.DONE and stored.attempts == 0


async def test_wake_makes_an_idle_worker_start_at_once(queue):
    publish = Publisher(queue)
    worker = Worker(queue, FakeEngine(), publish, SETTINGS)  # poll every 30 s
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(0.05)
        await queue.enqueue(new_job())
        await asyncio.sleep(0.2)
        assert worker.claims == 0  # no busy polling: it sleeps until woken
        worker.wake()
        await asyncio.wait_for(publish.event.wait(), 2)
        assert worker.jobs_complete == 1
    finally:
        worker.stop()
        await asyncio.wait_for(run, 2)


async def test_poll_fallback_and_stop(queue):
    publish = Publisher(queue)
    worker = Worker(queue, FakeEngine(), publish, SETTINGS.replace(worker_poll_seconds=0.05))
    run = asyncio.create_task(worker.run())
    await asyncio.sleep(0.02)
    await queue.enqueue(new_job())  # e.g. by another process: nobody calls wake()
    await asyncio.wait_for(publish.event.wait(), 2)
    worker.stop()
    await asyncio.wait_for(run, 2)
    assert run.done() and worker.jobs_complete == 1


async def test_result_is_thread_json(queue):
    await queue.enqueue(new_job(url=None))
    await Worker(queue, FakeEngine(), Publisher(queue), SETTINGS).run_burst()
    [job] = await queue.list_jobs()
    data = json.loads(job.result)
    assert data["url"] is None and data["comments"][1]["text"] == "Reminds me of SICP."


class GatedEngine(FakeEngine):
    """Holds the titles in ``held`` until ``release`` is set: a long thread next to short ones."""

    def __init__(self, *held: str) -> None:
        super().__init__()
        self.held = set(held)
        self.release = asyncio.Event()
        self.finished: list[str] = []

    async def work(self, requests) -> None:
        title = requests[0].prompt.removeprefix("<|endoftext|>").split("\n", 1)[0]
        if title in self.held:
            await self.release.wait()
        self.finished.append(title)


async def _until(condition, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


@contextlib.asynccontextmanager
async def _serving(worker: Worker):
    run = asyncio.create_task(worker.run())
    worker.wake()
    try:
        yield worker
    finally:
        worker.stop()
        worker.engine.release.set()
        await asyncio.wait_for(run, 5)


async def test_a_slot_freed_by_a_short_job_takes_the_next_one_while_a_long_job_runs(queue):
    await queue.enqueue(new_job("long"))
    await queue.enqueue(new_job("short 1"))
    engine = GatedEngine("long")
    async with _serving(Worker(queue, engine, Publisher(queue), SETTINGS.replace(batch_size=2))) as worker:
        await _until(lambda: engine.finished == ["short 1"])
        await queue.enqueue(new_job("short 2"))  # arrives while "long" still runs, and takes short 1's slot
        await queue.enqueue(new_job("short 3"))
        worker.wake()
        await _until(lambda: engine.finished == ["short 1", "short 2", "short 3"] and worker.jobs_complete == 3)
        assert worker.running == 1 and engine.most_at_once == 2  # never more than batch_size at once
        engine.release.set()
        await _until(lambda: worker.jobs_complete == 4)
        assert engine.finished[-1] == "long"


async def test_a_job_waits_for_room_in_the_token_budget(queue):
    await queue.enqueue(new_job("long"))
    engine = GatedEngine("long")
    async with _serving(Worker(queue, engine, Publisher(queue), SETTINGS.replace(token_budget=150))) as worker:
        await _until(lambda: worker.running == 1)  # ~115 tokens a job: the next one does not fit beside it
        short = await queue.enqueue(new_job("short"))
        worker.wake()
        await asyncio.sleep(0.1)
        assert engine.finished == [] and (await queue.get(short.id)).status is JobStatus.QUEUED  # no room yet
        engine.release.set()
        await _until(lambda: worker.jobs_complete == 2)
        assert engine.finished == ["long", "short"]


async def test_stop_lets_running_jobs_finish(queue):
    await queue.enqueue(new_job("long"))
    engine, publish = GatedEngine("long"), Publisher(queue)
    worker = Worker(queue, engine, publish, SETTINGS)
    run = asyncio.create_task(worker.run())
    worker.wake()
    await _until(lambda: worker.running == 1)
    worker.stop()
    await asyncio.sleep(0.05)
    assert not run.done()
    engine.release.set()
    await asyncio.wait_for(run, 5)
    assert worker.jobs_complete == 1 and [j for j, _ in publish.published] == [1]
