"""Weight-stationary linear layers on a CPU (workers/cpu_linear.py): the same products as nn.Linear, the
model's decoding unchanged, and the loader and the profile cache aware of them."""

import pytest
import torch
from torch import nn

from decoding import PPDDecoder, PromptTokens, VanillaDecoder, default_tree_set, reference_greedy
from tests.helpers_models import make_tiny_llama, save_tiny_llama_dir
from workers import numerics
from workers.configs import ModelConfig
from workers.cpu_linear import (
    DEFAULT_ROWS_BELOW,
    ROW_CANDIDATES,
    RowsBelowMeasurement,
    WeightStationaryLinear,
    _linear_weights,
    _timed_weights,
    choose_rows_below,
    linear_kind,
    linear_rows_below,
    measure_rows_below,
    use_weight_stationary_linears,
)
from workers.models import load_model


def linear_pair(in_features: int, out_features: int, bias: bool, seed: int = 0):
    plain = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        plain.weight.copy_(torch.randn(out_features, in_features, generator=g) / in_features**0.5)
        if bias:
            plain.bias.copy_(torch.randn(out_features, generator=g))
    stationary = nn.Linear(in_features, out_features, bias=bias)
    stationary.load_state_dict(plain.state_dict())
    assert use_weight_stationary_linears(stationary) == 1 and type(stationary) is WeightStationaryLinear
    return plain, stationary


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (3, 24), (4, 24), (2, 4, 24), (9, 24), (10, 24), (3, 3, 24),
                                   (7, 9, 24), (130, 24)])
def test_the_product_is_nn_linears_to_rounding(shape, bias):
    plain, stationary = linear_pair(24, 40, bias)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    expected, got = plain(x), stationary(x)
    assert got.shape == expected.shape == (*shape[:-1], 40)
    assert got.is_contiguous()  # the model's attention .view()s its projections
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # A strided input (a tree's leading slots) too.
    if len(shape) == 3:
        torch.testing.assert_close(stationary(x[:, :2]), plain(x[:, :2]), rtol=1e-5, atol=1e-5)


def test_other_dtypes_take_nn_linears_own_path():
    plain, stationary = linear_pair(24, 40, bias=True)
    x = torch.randn(3, 24, dtype=torch.float64)
    plain, stationary = plain.double(), stationary.double()
    assert torch.equal(stationary(x), plain(x))  # bit for bit: the same kernel


def test_gradients_flow_as_through_nn_linear():
    """Prompt-token training backpropagates through the frozen model's linear layers."""
    plain, stationary = linear_pair(24, 40, bias=True)
    grads = []
    for layer in (plain, stationary):
        x = torch.randn(3, 24, generator=torch.Generator().manual_seed(2), requires_grad=True)
        layer(x).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


def test_only_plain_linears_change_and_tied_weights_stay_tied():
    class Adapted(nn.Linear):  # a subclass (a quantised or adapted layer) is not ours to change
        pass

    model = make_tiny_llama(vocab_size=64, hidden_size=32, dtype=torch.float32, tie_word_embeddings=True)
    model.model.layers[0].mlp.up_proj.__class__ = Adapted
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert linear_kind(model) == "torch"
    assert use_weight_stationary_linears(model) == linears
    assert linear_kind(model) == "weight_stationary"
    assert type(model.model.layers[0].mlp.up_proj) is Adapted
    assert type(model.lm_head) is WeightStationaryLinear
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_greedy_decoding_of_a_model_with_them_is_lossless():
    """Plain, PPD and the reference decoder all run the model with weight-stationary linear layers; PPD's
    output stays the plain greedy output, and the model's logits are nn.Linear's to rounding."""
    model = make_tiny_llama(vocab_size=64, hidden_size=32, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    before = model(input_ids=ids).logits
    use_weight_stationary_linears(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 7, 1, 5)]
    pt = PromptTokens.from_token_embeddings(model, k=3, n=1, base_model_id="tiny", base_model_hash="0",
                                            generator=torch.Generator().manual_seed(0))
    expected = [reference_greedy(model, p, 16).token_ids for p in prompts]
    assert [r.token_ids for r in VanillaDecoder(model).generate(prompts, 16)] == expected
    assert [r.token_ids for r in PPDDecoder(model, pt, default_tree_set(k=3)).generate(prompts, 16)] == expected


def test_the_loader_uses_them_on_a_cpu_in_float32_only(tmp_path, default_tokenizer):
    model_dir = save_tiny_llama_dir(tmp_path / "m", default_tokenizer)
    cache = str(tmp_path / "cache")
    fixed = load_model(ModelConfig(model=str(model_dir), device="cpu", cache_dir=cache, cpu_linear="weight_stationary"))
    assert linear_kind(fixed.model) == "weight_stationary"
    assert linear_rows_below(fixed.model) == DEFAULT_ROWS_BELOW
    # auto, the default: a model this small is left on nn.Linear unmeasured, the same in every process.
    assert linear_kind(load_model(ModelConfig(model=str(model_dir), device="cpu", cache_dir=cache)).model) == "torch"
    assert linear_kind(load_model(ModelConfig(model=str(model_dir), device="cpu", cache_dir=cache,
                                              cpu_linear="torch")).model) == "torch"
    assert linear_kind(load_model(ModelConfig(model=str(model_dir), device="cpu", dtype="bfloat16",
                                              cache_dir=cache)).model) == "torch"


@pytest.mark.parametrize("measured_rows_below", [1, 6])
def test_auto_converts_below_the_measured_rows_or_not_at_all(tmp_path, default_tokenizer, monkeypatch,
                                                             measured_rows_below):
    """The default measures on the loaded model; where the second form never won (1), nn.Linear stays."""
    seen = []

    def fake_measure(model):
        seen.append(linear_kind(model))
        return RowsBelowMeasurement(rows_below=measured_rows_below, torch_ms={1: 2.0}, stationary_ms={1: 1.0})

    monkeypatch.setattr(numerics, "measure_rows_below", fake_measure)
    monkeypatch.setattr(numerics, "worth_measuring", lambda model: True)  # the tiny model is under the floor
    model_dir = save_tiny_llama_dir(tmp_path / "m", default_tokenizer)
    loaded = load_model(ModelConfig(model=str(model_dir), device="cpu", cache_dir=str(tmp_path / "cache")))
    assert seen == ["torch"]  # measured once, on the model as loaded
    assert linear_rows_below(loaded.model) == (None if measured_rows_below == 1 else measured_rows_below)
    assert linear_kind(loaded.model) == ("torch" if measured_rows_below == 1 else "weight_stationary")
    assert loaded.rows_below_decision.rows_below == measured_rows_below  # recorded, nn.Linear's 1 too
    bf16 = load_model(ModelConfig(model=str(model_dir), device="cpu", dtype="bfloat16",
                                  cache_dir=str(tmp_path / "cache")))
    assert linear_kind(bf16.model) == "torch" and len(seen) == 1  # nothing to measure off float32


# This VM's table (the module docstring), milliseconds by rows.
VM_TORCH_MS = {1: 18.7, 2: 28.3, 3: 31.3, 4: 27.7, 6: 22.0, 8: 28.3, 10: 33.2, 12: 33.8, 16: 40.0}
VM_STATIONARY_MS = {1: 8.8, 2: 9.0, 3: 11.6, 4: 9.9, 6: 19.1, 8: 21.4, 10: 28.2, 12: 33.8, 16: 45.0}


@pytest.mark.parametrize("torch_ms, stationary_ms, expected", [
    (VM_TORCH_MS, VM_STATIONARY_MS, 12),                      # a tie counts as no faster
    ({1: 5.0, 2: 6.0, 4: 7.0}, {1: 6.0, 2: 5.0, 4: 5.0}, 1),   # slower at one row: nn.Linear throughout
    ({1: 5.0, 2: 6.0, 4: 7.0}, {1: 4.0, 2: 5.0, 4: 6.0}, 5),   # faster at every count: one past the largest
    ({1: 5.0, 2: 6.0, 4: 7.0}, {1: 4.0, 2: 6.5, 4: 6.0}, 2),   # the first loss ends it
])
def test_the_rows_below_are_where_the_second_form_stops_winning(torch_ms, stationary_ms, expected):
    assert choose_rows_below(torch_ms, stationary_ms) == expected


def test_a_layer_runs_nn_linears_kernel_from_its_rows_below_up():
    plain, stationary = linear_pair(24, 40, bias=True)
    use_weight_stationary_linears(stationary, rows_below=3)  # converted again: the new threshold
    assert stationary.rows_below == 3
    g = torch.Generator().manual_seed(3)
    for rows in (3, 4, 9):
        x = torch.randn(rows, 24, generator=g)
        assert torch.equal(stationary(x), plain(x))  # bit for bit: nn.Linear's own kernel
    x = torch.randn(2, 24, generator=g)
    torch.testing.assert_close(stationary(x), plain(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):
        use_weight_stationary_linears(stationary, rows_below=0)


def test_the_measurement_times_each_weight_shape_once_at_least_and_tied_weights_once():
    model = make_tiny_llama(vocab_size=64, hidden_size=32, dtype=torch.float32, tie_word_embeddings=True)
    linear_weights = {m.weight.data_ptr(): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    shapes = {w.shape for w in linear_weights.values()}
    one_of_each = _timed_weights(_linear_weights(model), budget_bytes=0)
    assert sorted(w.shape for w in one_of_each) == sorted(shapes)
    everything = _timed_weights(_linear_weights(model), budget_bytes=2**30)
    assert len(everything) == len(linear_weights)  # the lm_head tied to the embedding counts once
    assert {w.data_ptr() for w in everything} == set(linear_weights)


def test_the_measurement_covers_every_candidate_and_chooses_by_its_own_table():
    model = make_tiny_llama(vocab_size=64, hidden_size=32, dtype=torch.float32)
    measured = measure_rows_below(model, candidates=(1, 2, 4), repeats=2, min_bytes=0)
    assert measured.torch_ms.keys() == measured.stationary_ms.keys() == {1, 2, 4}
    assert all(ms > 0 for ms in [*measured.torch_ms.values(), *measured.stationary_ms.values()])
    assert measured.rows_below == choose_rows_below(measured.torch_ms, measured.stationary_ms)
    assert set(ROW_CANDIDATES) >= {1, 2, 4, 8} and max(ROW_CANDIDATES) >= DEFAULT_ROWS_BELOW
    # A model this small is not measured (its weights sit in the caches: timings would be noise), nor one with
    # no float32 weight.
    assert measure_rows_below(model) == RowsBelowMeasurement(rows_below=1, torch_ms={}, stationary_ms={})
    assert measure_rows_below(model.to(torch.float64), min_bytes=0).rows_below == 1
