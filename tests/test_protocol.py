"""The decoder protocol (decoding/protocol.py): every decoder satisfies it (mypy checks this module: ``make lint``),
a decoder that does not is refused by the type checker, and per-step state passes through the plan, never
parked on the decoder between hooks: the plan a step ran with is the one its finish gets."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

from decoding import PPDDecoder, VanillaDecoder, default_tree_set, reference_greedy
from decoding.propd import ProPDDecoder
from decoding.protocol import Decoder, StepPlan
from decoding.slots import Request, SlotBatch
from tests.helpers_models import make_tiny_llama
from tests.test_propd import BUDGETS, TABLE
from tests.test_pruning import LAYERS, random_head
from tests.test_sampling import VOCAB, K, prompts_for, untrained
from trees.builder import tree_family


def every_decoder(model) -> dict[str, Decoder]:
    """Each decoder the engine builds, typed as the protocol: mypy checks every entry against it."""
    pt = untrained(model)
    return {
        "vanilla": VanillaDecoder(model),
        "ppd": PPDDecoder(model, pt, default_tree_set(K)),
        "ppd, pruned": PPDDecoder(model, pt, default_tree_set(K), prune_head=random_head(model, 4)),
        "propd": ProPDDecoder(model, pt, tree_family(K, BUDGETS), TABLE),
        "propd, pruned": ProPDDecoder(model, pt, tree_family(K, BUDGETS), TABLE, prune_head=random_head(model, 4)),
    }


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=LAYERS, seed=3)


@pytest.mark.parametrize("name", ["vanilla", "ppd", "ppd, pruned", "propd", "propd, pruned"])
def test_every_decoder_plans_steps_and_decodes_without_parking_state(model, name):
    """No attribute appears on a decoder once it is built (by a plan, a step or a finish), and each plan holds
    the sizes of its rows within the widest. The rows still equal plain greedy decoding."""
    decoder = every_decoder(model)[name]
    built = set(vars(decoder))
    first = decoder.plan_step(None)
    assert isinstance(first, StepPlan) and first.sizes == first.widest
    prompts = prompts_for(3, seed=8)
    batch = SlotBatch(decoder, num_slots=2)
    batch.add([Request(p, 6, tag=i) for i, p in enumerate(prompts)])
    plans: list[StepPlan] = []
    finished: list[tuple[StepPlan, int]] = []
    plan_step, finish_step = decoder.plan_step, decoder.finish_step

    def planning(rows):
        plans.append(plan_step(rows))
        return plans[-1]

    def finishing(plan, report):
        finished.append((plan, report.before.size))
        finish_step(plan, report)

    decoder.plan_step, decoder.finish_step = planning, finishing  # type: ignore[method-assign]
    got = {req.tag: res.token_ids for req, res in batch.run()}
    del decoder.plan_step, decoder.finish_step
    assert set(vars(decoder)) == built
    assert got == {i: reference_greedy(model, p, 6).token_ids for i, p in enumerate(prompts)}
    assert [plan for plan, _ in finished] == plans and all(rows <= 2 for _, rows in finished)
    assert all(all(a <= b for a, b in zip(p.sizes, p.widest)) for p in plans)


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is a dev dependency")
def test_the_type_checker_refuses_a_decoder_that_lacks_the_step(tmp_path):
    from mypy import api

    source = tmp_path / "broken.py"
    source.write_text(textwrap.dedent("""
        from decoding.protocol import Decoder

        class Planless:
            model = None
            eos_token_ids: list[int] = []

        def use(decoder: Decoder) -> None: ...

        use(Planless())
    """))
    # torch and transformers unread (their types Any here): checking them takes a minute, and the protocol's
    # methods are told apart by their names and arity alone
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nignore_missing_imports = True\nfollow_imports = silent\n"
                      "[mypy-torch.*,transformers.*]\nfollow_imports = skip\n")
    out, _, status = api.run([str(source), "--config-file", str(config), "--cache-dir", str(tmp_path / "cache")])
    assert status == 1 and 'incompatible type "Planless"; expected "Decoder"' in out, out
