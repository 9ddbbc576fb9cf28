"""The fixed-shape step (decoding/runners.py, every step mode but "eager"): the part of a step that is compiled and
captured. It must give every row the tokens of that row decoded alone, read nothing back from the device
inside, and trace as one graph per shape bucket (dynamo ``fullgraph=True``), on tiny float64 models."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from decoding.runners import shape_key
from decoding.slots import Request, SlotBatch, slot_bucket
from tests.test_continuous import make_decoder, model, rows  # noqa: F401 - fixtures

aten = torch.ops.aten
DECODING = str(Path(__file__).resolve().parents[1] / "decoding")
# Ops that read the device from the host (on a GPU each waits for the device to drain its queue).
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default, aten.equal.default}


class HostReads(TorchDispatchMode):
    """Counts the ops dispatched that read device memory on the host."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def test_slot_buckets_are_powers_of_two_up_to_the_slots():
    assert [slot_bucket(a, 6) for a in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert [slot_bucket(a, 8) for a in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


def test_fixed_views_are_powers_of_two_from_64_up_to_the_capacity():
    from decoding.slot_cache import fixed_view

    assert [fixed_view(longest, 1, 1024) for longest in (0, 10, 63, 64, 127, 128, 500, 1023)] == \
        [64, 64, 64, 128, 128, 256, 512, 1024]
    assert fixed_view(200, 16, 256) == 256 and fixed_view(600, 16, 768) == 768  # capped by the cache


def test_the_kv_capacity_doubles_so_a_compiled_step_sees_few_cache_shapes():
    from decoding.slot_cache import SlotCache, capacity_for

    assert [capacity_for(c) for c in (0, 1, 256, 257, 512, 513, 1024, 1025, 3000, 8192)] == \
        [256, 256, 256, 512, 512, 1024, 1024, 2048, 4096, 8192]
    cache, seen = SlotCache(num_layers=1, num_slots=2), set()
    for columns in range(1, 8193, 64):  # rows growing one 64-column step at a time
        cache.ensure_capacity(columns)
        seen.add(cache.capacity)
    assert sorted(seen) == [256, 512, 1024, 2048, 4096, 8192]


def run_joining(model, rows, method, sampled, offset, **batch_args):
    """Rows 0 and 1 start in a batch of 4 slots (one idle in the bucket of 4 once row 2 joins); row 2 joins
    after ``offset`` steps. Returns each row's tokens and the batch."""
    (p0, n0, s0, t0), (p1, n1, s1, t1), (p2, n2, s2, t2) = rows[sampled]
    batch = SlotBatch(make_decoder(method, model, [t0, t1, t2]), num_slots=4, **batch_args)
    batch.add([Request(p0, n0, s0, tag=0), Request(p1, n1, s1, tag=1)])
    finished = []
    for _ in range(offset):
        finished += batch.step()
    batch.add(Request(p2, n2, s2, tag=2))
    finished += batch.run()
    return {req.tag: res.token_ids for req, res in finished}, [t0[:n0], t1[:n1], t2[:n2]]


@pytest.mark.parametrize("method", ["vanilla", "ppd", "propd"])
@pytest.mark.parametrize("sampled", [False, True])
def test_fixed_shape_steps_equal_each_row_decoded_alone(model, rows, method, sampled):  # noqa: F811
    for offset in (0, 2, 5):
        got, want = run_joining(model, rows, method, sampled, offset, step_mode="fixed")
        assert got == dict(enumerate(want)), f"offset {offset}"


@pytest.mark.parametrize("method,sampled,fixed", [
    ("vanilla", False, False), ("ppd", False, False), ("propd", False, False),
    ("vanilla", True, True), ("ppd", True, True), ("propd", True, True), ("ppd", False, True)])
def test_the_device_step_reads_nothing_back_and_the_loop_reads_once_a_step(model, rows, method, sampled, fixed,
                                                                           monkeypatch):  # noqa: F811
    """Inside the device step no op reads the device (eager greedy steps too; sampled ones only at fixed
    shapes, where top_p's cut is found without a data-dependent look). Around it, the decoding code reads the
    device once a step: the packed tokens, counts, states and guesses (``.tolist()`` does not dispatch on a
    CPU tensor, so it is counted where it is called)."""
    modes: list[HostReads] = []
    device_step = SlotBatch._device_step

    def watched(self, *args):
        modes.append(HostReads())
        with modes[-1]:
            return device_step(self, *args)

    tolist_calls = []
    tolist = torch.Tensor.tolist

    def counted(t):
        caller = inspect.stack(0)[1].filename
        if caller.startswith(DECODING) and not caller.endswith("online_stats.py"):  # host-side statistics
            tolist_calls.append(caller)
        return tolist(t)

    monkeypatch.setattr(SlotBatch, "_device_step", watched)
    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    got, want = run_joining(model, rows, method, sampled, 2, step_mode="fixed" if fixed else "eager")
    assert got == dict(enumerate(want))
    assert modes and all(m.reads == [] for m in modes), [m.reads for m in modes if m.reads][:1]
    assert len(tolist_calls) == len(modes), set(tolist_calls)


def test_pruning_is_refused_at_fixed_shapes(model, rows):  # noqa: F811
    with pytest.raises(ValueError, match="pruning"):
        SlotBatch(make_decoder("pruned", model, []), num_slots=2, step_mode="fixed")


SLOW = pytest.mark.slow  # ~15 s each: each of ProPD's tree sets is traced anew


@pytest.mark.parametrize("method,sampled", [
    ("vanilla", False), ("vanilla", True), ("ppd", False), ("ppd", True),
    pytest.param("propd", False, marks=SLOW), pytest.param("propd", True, marks=SLOW)])
def test_every_buckets_step_traces_as_one_graph(model, rows, method, sampled, monkeypatch):  # noqa: F811
    """dynamo with fullgraph=True raises at the first graph break (a host read, a data-dependent shape, an
    unsupported call): every step of a run, in every bucket it reaches, traces whole."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # called once per graph dynamo compiles
        graphs.append(gm)
        return gm.forward

    traced = torch.compile(SlotBatch._device_step, fullgraph=True, backend=backend, dynamic=False)
    shapes = set()

    def device_step(self, A, buffers, sizes, view, draw):
        shapes.add(shape_key(A, buffers, sizes, view, draw))
        return traced(self, A, buffers, sizes, view, draw)

    monkeypatch.setattr(SlotBatch, "_device_step", device_step)
    with torch._dynamo.config.patch(recompile_limit=64):
        got, want = run_joining(model, rows, method, sampled, 2, step_mode="fixed")
    assert got == dict(enumerate(want))
    assert {key[0] for key in shapes} >= {2, 4}  # two rows, then three in the bucket of four
    assert len(graphs) == len(shapes)  # one graph per shape: nothing else (a counter, a length) specialises it


@pytest.mark.slow  # ~2 minutes each: inductor compiles every shape the run reaches
@pytest.mark.parametrize("method,sampled", [("vanilla", True), ("ppd", False), ("propd", True)])
def test_the_compiled_step_gives_each_row_its_tokens_alone(model, rows, method, sampled):  # noqa: F811
    """torch.compile (inductor) on float64: the same tokens, with a row joining mid-flight."""
    torch._dynamo.reset()
    got, want = run_joining(model, rows, method, sampled, 2, step_mode="compile")
    assert got == dict(enumerate(want))


def test_a_compiled_step_of_one_shape_gives_each_row_its_tokens_alone(model, rows):  # noqa: F811
    """The default run's compiled check: two greedy rows of one length in two slots, a single shape."""
    torch._dynamo.reset()
    (p0, _, _, t0), (p1, _, _, t1), _ = rows[False]
    batch = SlotBatch(make_decoder("vanilla", model, []), num_slots=2, step_mode="compile")
    batch.add([Request(p0, 5, tag=0), Request(p1, 5, tag=1)])
    got = {req.tag: res.token_ids for req, res in batch.run()}
    assert got == {0: t0[:5], 1: t1[:5]}
    assert len(batch.runner.shapes) == 1


def test_the_compiled_step_writes_the_kv_cache_in_place(model, rows):  # noqa: F811
    """A PPD step writes new KV and compacts accepted columns into the cache. Compiled, a write into a view of
    the cache, or a scatter, became a copy of every layer's whole cache and a write-back, every step: no
    buffer of a cache layer's shape may be allocated, and no kernel may loop over a whole layer."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    (p0, _, _, t0), (p1, _, _, t1), _ = rows[False]
    batch = SlotBatch(make_decoder("ppd", model, [t0, t1]), num_slots=2, step_mode="compile")
    batch.cache.ensure_capacity(768)  # a capacity of 1,024 columns: the step reads a view of 64
    batch.add([Request(p0, 6, tag=0), Request(p1, 6, tag=1)])
    got, code = run_and_get_code(lambda: {req.tag: res.token_ids for req, res in batch.run()})
    assert got == {0: t0[:6], 1: t1[:6]}
    keys = batch.cache.layers[0].keys
    assert keys.shape[2] == 1024
    allocated = f"empty_strided_cpu(({', '.join(map(str, keys.shape))})"
    source = "\n".join(code)
    assert allocated not in source and f"{keys.numel()}L" not in source
    assert "index_put" in source, "the cache writes are not in the compiled code"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["vanilla", "ppd", "propd"])
@pytest.mark.parametrize("sampled", [False, True])
def test_cuda_graph_steps_equal_each_row_decoded_alone(rows, method, sampled):  # noqa: F811
    """On a GPU: every step replayed from a captured graph, rows joining mid-flight, float64."""
    from tests.helpers_models import make_tiny_llama
    from tests.test_continuous import LAYERS, VOCAB, K  # noqa: F401

    cuda_model = make_tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=LAYERS, seed=3).cuda()
    cpu_rows = {s: [(p, n, params, t) for p, n, params, t in rows[s]] for s in rows}
    for offset in (0, 3):
        got, want = run_joining(cuda_model, cpu_rows, method, sampled, offset, step_mode="cuda_graphs")
        assert got == dict(enumerate(want)), f"offset {offset}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_profile_of_captured_steps_times_each_size_from_its_graph():
    """On a GPU: the latency profile of a worker with CUDA graphs captures each size's step and times replays."""
    from profiling.latency import measure_profile
    from tests.helpers_models import make_tiny_llama
    from tests.test_continuous import VOCAB, K, untrained

    cuda_model = make_tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=3).cuda().float()
    profile = measure_profile(cuda_model, untrained(cuda_model), model_hash="tiny", batch_sizes=[1, 2],
                              slots=[1, 4, 8], context_len=32, budget_s=60, step_mode="cuda_graphs")
    assert profile.step_mode == "cuda_graphs" and profile.k == K
    assert {(p.batch, p.slots) for p in profile.points} == {(b, s) for b in (1, 2) for s in (1, 4, 8)}
    assert all(0 < p.seconds < 1 for p in profile.points)


def test_the_engine_picks_its_step_mode_from_the_config_and_the_device(tiny_model_dir):
    """On a CPU: eager unless compile is asked (cuda_graphs is for CUDA devices); the mode is in the worker's
    description and in each row's numeric path, since compiled kernels round differently."""
    from workers.configs import DecodingConfig, ModelConfig
    from workers.engine import DecodeEngine
    from workers.models import load_model

    loaded = load_model(ModelConfig(model=str(tiny_model_dir)))
    torch._dynamo.reset()
    # two prompts of one length over 128 tokens: every step of theirs attends over 256 columns, the view the
    # engine warms up, with both slots busy
    rows = [{"id": f"r{i}", "prompt": text} for i, text in enumerate(["The sea is " * 45, "The sky is " * 45])]
    outputs = {}
    for config, mode in ((DecodingConfig(method="vanilla", max_new_tokens=4), "eager"),
                         (DecodingConfig(method="vanilla", max_new_tokens=4, cuda_graphs=True), "eager"),
                         (DecodingConfig(method="vanilla", max_new_tokens=4, compile=True), "compile")):
        engine = DecodeEngine(loaded, config, batch_size=2)
        assert engine.step_mode == engine.batch.step_mode == engine.describe()["step_mode"] == mode
        assert engine.batch.runner.fixed_shapes == (mode != "eager")
        assert ("step=compile" in engine.numeric_path) == (mode == "compile")
        if mode == "compile":  # the full batch's shape was compiled at start-up, and the rows use it
            assert len(engine.batch.runner.shapes) == 1  # before any row ran: the warm-up compiled it
        outputs[mode] = [out.output_token_ids for out in engine.run_rows(rows)]
        if mode == "compile":
            assert len(engine.batch.runner.shapes) == 1
    assert outputs["compile"] == outputs["eager"]


def test_compile_auto_weighs_the_workers_share_against_the_recorded_compile_time(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    """compile=auto in the engine: eager without a job size or for a short share; compiled where the record of
    an earlier compile here says it pays; its own compile time and step rate recorded for the next worker; and
    eager again once compiled steps were measured no faster than eager ones."""
    import workers.engine
    from workers.compile_choice import estimate_compile, record_compile, record_path
    from workers.configs import DecodingConfig, ModelConfig
    from workers.engine import DecodeEngine
    from workers.models import load_model

    loaded = load_model(ModelConfig(model=str(tiny_model_dir)))
    torch._dynamo.reset()
    config = DecodingConfig(method="vanilla", max_new_tokens=4, compile="auto")
    unknown = DecodeEngine(loaded, config, batch_size=2, cache_dir=str(tmp_path))
    assert unknown.step_mode == "eager" and "no job size" in unknown.describe()["compile"]
    short = DecodeEngine(loaded, config, batch_size=2, cache_dir=str(tmp_path), expected_rows=2)
    assert short.step_mode == "eager" and short.describe()["compile"].startswith("compile auto: eager")
    assert "a first compile, guessed" in short.describe()["compile"]
    record_compile(tmp_path, short.compile_key, 0.001)  # as if a compile of this step here had taken 1 ms
    long = DecodeEngine(loaded, config, batch_size=2, cache_dir=str(tmp_path), expected_rows=10**6)
    assert long.compile_key == short.compile_key
    assert long.step_mode == "compile" and long.describe()["compile"].startswith("compile auto: compiled")
    recorded = estimate_compile(tmp_path, long.compile_key).compile_s  # its own warm-up compile, recorded
    assert recorded > 0.001 and recorded == pytest.approx(long.batch.graph_stats()["capture_seconds"], abs=0.01)

    monkeypatch.setattr(workers.engine, "RATE_MIN_STEPS", 3)
    rows = [{"id": f"r{i}", "prompt": f"Count to {i}:"} for i in range(4)]
    for engine in (long, short):  # a compiled worker and an eager one decode; each records its steps' rate
        engine.run_rows(rows)
        assert engine.clock.steps >= 3 and engine.tokens_decoded > 0
    rates = json.loads(record_path(tmp_path, long.compile_key).read_text())["step_tokens_per_s"]
    assert set(rates) == {"compile", "eager"} and min(rates.values()) > 0
    assert estimate_compile(tmp_path, long.compile_key).speedup == pytest.approx(rates["compile"] / rates["eager"],
                                                                                 rel=1e-3)
    record_path(tmp_path, long.compile_key).write_text(json.dumps(
        {"last_compile_s": 0.001, "step_tokens_per_s": {"compile": 40.0, "eager": 50.0}}))  # measured slower
    measured = DecodeEngine(loaded, config, batch_size=2, cache_dir=str(tmp_path), expected_rows=10**6)
    assert measured.step_mode == "eager" and "gain nothing here (0.80x" in measured.describe()["compile"]


def test_a_trial_step_is_undone_and_a_profile_of_fixed_steps_times_each_size(model):  # noqa: F811
    """The latency profile of a captured or compiled step runs the SlotBatch's device step at fixed shapes,
    undoing each: the slots step from the same state every time, and the prompts' KV stays as written."""
    from decoding import PPDDecoder
    from decoding.tree import tree_set_buffers
    from profiling.latency import FixedStepTimer
    from tests.test_continuous import K, untrained
    from trees.synthetic import synthetic_tree_set

    decoder = PPDDecoder(model, untrained(model), synthetic_tree_set(K, 10, 1))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 50, (2, 20), generator=g).tolist()
    root, guesses = torch.randint(0, 50, (2,), generator=g), torch.randint(0, 50, (2, K, 10), generator=g)
    seconds = FixedStepTimer(decoder, 2, prompts, root, guesses, 16, "fixed")
    batch = seconds.slots
    before = {name: getattr(batch, name).clone() for name in ("kv_len", "root", "state", "guesses")}
    prompt_kv = batch.cache.layers[0].keys[:, :, :20].clone()
    for size in (1, 8, 16):
        buffers = tree_set_buffers(synthetic_tree_set(K, 10, size), 1)
        with torch.inference_mode():
            batch.cache.layers[0].keys[:, :, 20:].zero_()
        seconds(buffers)
        written = batch.cache.layers[0].keys[:, :, 20:].abs().sum((0, 1, 3)) > 0  # [columns]: scratch the step wrote
        assert written[:size].all()  # the step ran: a tree of ``size`` slots wrote past the prompts
        seconds(buffers)
        for name, value in before.items():
            assert torch.equal(getattr(batch, name), value), name
        assert torch.equal(batch.cache.layers[0].keys[:, :, :20], prompt_kv)
