"""The memory plan (workers/memory.py): slots and capacity for a model shape on a faked device, the errors that
give the numbers, and an engine that allocates its KV once at the planned size and refuses rows past the budget."""

from __future__ import annotations

import pytest

from decoding import slots as slots_module
from decoding.slots import prefill_chunks
from decoding.vanilla import VanillaDecoder
from tests.helpers_models import tiny_loaded_model
from workers import engine as engine_module
from workers.configs import DecodingConfig, MemoryConfig
from workers.engine import DecodeEngine
from workers.memory import DoesNotFit, ModelShape, forward_activation_bytes, job_capacity, plan_memory

GiB = 1 << 30
LLAMA_8B = ModelShape(layers=32, heads=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=14336, vocab=128256,
                      max_context=131072, dtype_bytes=2, weights_bytes=16_060_522_496)  # Llama-3.1-8B, bfloat16
SMOLLM2_135M = ModelShape(layers=30, heads=9, kv_heads=3, head_dim=64, hidden=576, intermediate=1536, vocab=49152,
                          max_context=8192, dtype_bytes=4, weights_bytes=538_090_112)  # the default, float32


def h100(shape: ModelShape, **kw):
    total = 80 * GiB
    args = dict(device="cuda:0", total=total, free=total - shape.weights_bytes - GiB // 2,
                capacity=job_capacity(2048, 256, shape.max_context, 256), step_tokens=64, prefill_columns=2048,
                graphs=True, batch_size=None, max_batch_size=4096, gpu_memory_utilization=0.9, cpu_memory_share=0.5)
    return plan_memory(shape, **{**args, **kw})


def test_kv_bytes_and_capacity_are_the_shapes_arithmetic():
    assert LLAMA_8B.kv_bytes_per_column == 32 * 2 * 8 * 128 * 2 == 131_072
    assert SMOLLM2_135M.kv_bytes_per_column == 30 * 2 * 3 * 64 * 4 == 46_080
    assert job_capacity(2048, 256, 131072, 256) == 2560  # 2,560 columns exactly: 2048 + 256 + 256
    assert job_capacity(2048, 64, 8192, 256) == 2560  # 2,368 rounded up to 256s
    assert job_capacity(8192, 4096, 8192, 1) == 8448  # capped by the context, plus one step
    # 256 slots of 8,192 columns of the 8B shape: the 256 GiB the issue counts
    assert 256 * job_capacity(8192 - 256, 256, 131072, 0) * LLAMA_8B.kv_bytes_per_column == 256 * GiB


@pytest.mark.parametrize("shape", [LLAMA_8B, SMOLLM2_135M], ids=["llama-8b", "smollm2-135m"])
def test_auto_takes_the_most_slots_that_fit_and_a_fixed_batch_past_them_gives_the_numbers(shape):
    plan = h100(shape)
    assert plan.slots == plan.max_slots >= 1 and plan.free >= 0
    assert plan.budget == int(0.9 * 80 * GiB) and plan.in_use == shape.weights_bytes + GiB // 2
    assert plan.kv == plan.slots * plan.capacity * shape.kv_bytes_per_column
    assert plan.graph_pool > plan.activation > 0 and plan.max_graphs == 64
    assert plan.budget == plan.in_use + plan.activation + plan.graph_pool + plan.kv + plan.free
    assert h100(shape, batch_size=plan.slots).slots == plan.slots  # the most that fit do fit
    with pytest.raises(DoesNotFit, match=rf"--batch-size {plan.slots + 1} does not fit, {plan.slots} slots would"):
        h100(shape, batch_size=plan.slots + 1)
    assert h100(shape, step_tokens=256).slots < plan.slots < h100(shape, step_tokens=1).slots  # wider steps, fewer
    assert h100(shape, graphs=False).slots > plan.slots
    assert plan.with_slots(1).kv == plan.capacity * shape.kv_bytes_per_column
    with pytest.raises(DoesNotFit):
        plan.with_slots(plan.max_slots + 1)


def test_the_8b_shape_on_an_h100():
    plan = h100(LLAMA_8B)
    assert 100 <= plan.slots <= 128  # ~36 GiB of KV at 320 MiB a slot, beside ~10 GiB of activation twice
    assert plan.kv_per_slot == 2560 * 131_072 == 320 * 2**20
    assert f"{plan.slots} slots x 2560 columns, 320.0 MiB a slot" in plan.describe()


def test_a_model_that_does_not_fit_fails_with_the_numbers():
    with pytest.raises(DoesNotFit, match="the model does not fit: memory budget 14.40 GiB on cuda:0: in use 16.0"):
        plan_memory(LLAMA_8B, device="cuda:0", total=16 * GiB, free=0, capacity=2560, step_tokens=1,
                    prefill_columns=2048, graphs=True, batch_size=None, max_batch_size=64,
                    gpu_memory_utilization=0.9, cpu_memory_share=0.5)


def test_a_cpu_budgets_a_share_of_the_available_memory():
    plan = plan_memory(SMOLLM2_135M, device="cpu", total=24 * GiB, free=18 * GiB, capacity=2560, step_tokens=1,
                       prefill_columns=2048, graphs=False, batch_size=None, max_batch_size=64,
                       gpu_memory_utilization=0.9, cpu_memory_share=0.5)
    assert plan.budget == 9 * GiB and plan.in_use == 0 and plan.graph_pool == 0 and plan.slots == 64
    tight = plan_memory(SMOLLM2_135M, device="cpu", total=24 * GiB, free=2 * GiB, capacity=2560, step_tokens=1,
                        prefill_columns=2048, graphs=False, batch_size=None, max_batch_size=64,
                        gpu_memory_utilization=0.9, cpu_memory_share=0.5)
    assert 1 <= tight.slots < 9  # 1 GiB, at 112.5 MiB a slot, less the prefill's activation


def test_the_activation_counts_the_logits_and_the_scores():
    base = forward_activation_bytes(SMOLLM2_135M, 16, 64, 2560, logits=False)
    assert forward_activation_bytes(SMOLLM2_135M, 16, 64, 2560, logits=True) - base == 2 * 16 * 64 * 49152 * 4
    assert forward_activation_bytes(SMOLLM2_135M, 16, 64, 5120, logits=False) - base == 16 * 10 * 64 * 2560 * 4


def test_prefill_chunks_bound_the_padded_tokens():
    assert prefill_chunks([3, 3, 3], 6) == [(0, 2), (2, 3)]
    assert prefill_chunks([10, 2, 2], 8) == [(0, 1), (1, 3)]  # a prompt past the limit goes alone
    assert prefill_chunks([2, 2, 2, 2], 8) == [(0, 4)]
    assert prefill_chunks([], 8) == []


def test_chunked_prefill_decodes_the_same_tokens(monkeypatch):
    lm = tiny_loaded_model()
    prompts = [[5 + i, 7, 9 + i, 11, 3 + i][: 2 + i % 4] for i in range(6)]
    decoder = VanillaDecoder(lm.model, eos_token_ids=[])
    whole = decoder.generate(prompts, 6)
    monkeypatch.setattr(slots_module, "PREFILL_TOKENS", 4)  # a newcomer or two per prefill forward
    assert [r.token_ids for r in decoder.generate(prompts, 6)] == [r.token_ids for r in whole]


@pytest.fixture
def loaded():
    return tiny_loaded_model()


class IdsEngine(DecodeEngine):
    """Rows' prompts are token ids written out (the tiny model's stub tokenizer encodes nothing)."""

    def _encode(self, row: dict) -> list[int]:
        return [int(t) for t in row["prompt"].split()]


def fake_device(monkeypatch, free: int) -> None:
    monkeypatch.setattr(engine_module, "device_memory", lambda device: (64 * GiB, free))


def test_the_engine_allocates_its_kv_once_at_the_planned_capacity(loaded, monkeypatch):
    fake_device(monkeypatch, 8 * GiB)
    config = DecodingConfig(method="vanilla", max_new_tokens=8, memory=MemoryConfig(max_prompt_tokens=40))
    engine = IdsEngine(loaded, config, batch_size=3)
    cache, plan = engine.batch.cache, engine.memory
    assert (plan.slots, plan.capacity) == (3, 256)  # 40 + 8 + 1 rounded up to 256
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    assert all(k.shape[0] == 3 and k.shape[2] == 256 for k, _ in layers)  # allocated before any row
    allocated = sum(k.nbytes + v.nbytes for k, v in layers)
    assert allocated == plan.kv == 3 * 256 * ModelShape.of(loaded.model).kv_bytes_per_column
    pointers = [k.data_ptr() for k, _ in layers]
    rows = [{"id": f"r{i}", "prompt": " ".join([str(2 + i)] * (5 + 7 * i))} for i in range(5)]
    rows.append({"id": "long", "prompt": " ".join(map(str, range(2, 43)))})  # 41 tokens
    outputs = {o.id: o for o in engine.run_rows(rows)}
    assert [layer.keys.data_ptr() for layer in cache.layers] == pointers  # never grown
    error = outputs["long"].error
    assert error.code.value == "prompt_too_long" and "41 tokens" in error.message and "budget of 40" in error.message
    assert all(outputs[f"r{i}"].error is None and outputs[f"r{i}"].num_output_tokens == 8 for i in range(5))
    assert engine.describe()["memory"]["capacity"] == 256


def test_the_engine_lowers_auto_to_what_fits_and_refuses_a_fixed_batch_that_does_not(loaded, monkeypatch):
    shape = ModelShape.of(loaded.model)
    per_slot = 256 * shape.kv_bytes_per_column
    activation = max(forward_activation_bytes(shape, 6, 1, 256, logits=True),
                     forward_activation_bytes(shape, 1, 6 * 40, 40, logits=False))
    fake_device(monkeypatch, 2 * int(5.5 * per_slot + activation))  # a CPU budgets half: 5 slots fit, not 6
    config = DecodingConfig(method="vanilla", max_new_tokens=8, profile_budget_s=2,
                            memory=MemoryConfig(max_prompt_tokens=40))
    with pytest.raises(DoesNotFit, match=r"--batch-size 9 does not fit, 5 slots would: memory budget"):
        IdsEngine(loaded, config, batch_size=9)
    engine = IdsEngine(loaded, config, batch_size="auto", max_batch_size=64)
    assert engine.max_batch_size == 5 and engine.batch_size <= 5 and engine.memory.slots == engine.batch_size
    assert {int(b) for b in engine.describe()["batch_size_choice"]} <= {1, 4}  # only the candidates that fit
