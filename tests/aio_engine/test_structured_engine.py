"""Structured outputs through the engine on the embedded default model (a tiny Shakespeare Llama
with a real byte-level BPE): every JSON schema, regex, choice and EBNF output parses, alone and in a
batch with unconstrained requests (which keep their seeded tokens); bad constraints are a ValueError
that fails only their own request; grammars are compiled once and off the event loop; a grammar
that completes before min_tokens ends its request with "stop".

At temperature 1.0 a Shakespeare model rarely closes a JSON string, so the requests carry a
logit_bias towards the closing tokens and eos (as tests/structured's fake model does). The bias
acts after the grammar's bitmask: it only chooses among the tokens the grammar allows.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
import time

import jsonschema
import pytest
import pytest_asyncio
import torch

from aio_engine import LLM, AsyncEngine, EngineArgs, RequestOutput, SamplingParams
from kernels.sampling import gumbel_noise_reference
from structured import StructuredOutputsParams
from tests.structured.test_generation import ARITHMETIC, CHOICES, REGEXES, SCHEMAS, parse_arithmetic

from .conftest import assert_all_blocks_free, wait_until_idle

SEEDS = [0, 1, 2]
TIMEOUT = 60
PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nWe are", "KING RICHARD III:\nNow is the"]
ENGINE = dict(max_model_len=512, max_num_seqs=64)  # the default model: LLM() with no model


def validate(schema: dict, text: str) -> None:
    value = json.loads(text)
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(value)


@pytest.fixture(scope="module")
def llm():
    llm = LLM(**ENGINE)
    yield llm
    llm.core.grammars.close()


@pytest_asyncio.fixture(scope="module")
async def engine():
    engine = AsyncEngine.from_engine_args(EngineArgs(**ENGINE))
    yield engine
    await engine.shutdown()


@pytest.fixture(autouse=True)
def _blocks_free(request):
    """Every engine this module built ends each test with all of its KV blocks free."""
    yield
    for name in ("llm", "engine"):
        if name in request.fixturenames:
            assert_all_blocks_free(request.getfixturevalue(name).core)


def token_bias(tokenizer, wanted, value: float) -> dict[int, float]:
    """logit_bias `value` on every token whose text is non-empty and passes `wanted`."""
    return {i: value for i in range(len(tokenizer)) if (text := tokenizer.decode([i])) and wanted(text)}


@pytest.fixture(scope="module")
def closers(llm) -> dict[int, float]:
    """logit_bias towards the tokens that close strings, objects and arrays, and eos (not ',':
    the model then adds members forever)."""
    bias = token_bias(llm.tokenizer, lambda t: set(t) <= set('"])}'), 6.0)
    bias.update(token_bias(llm.tokenizer, lambda t: t in ("]", "}"), 8.0))
    bias.update({eos: 8.0 for eos in llm.core.eos_token_ids})
    return bias


def constrained(closers, seed: int, max_tokens: int = 400, **structured) -> SamplingParams:
    structured.setdefault("disable_any_whitespace", True)
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, logit_bias=closers,
                          structured_outputs=StructuredOutputsParams(**structured))


def free(seed: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=24, ignore_eos=True)


def run(llm: LLM, params: list[SamplingParams], prompts: list[str] | None = None) -> list[RequestOutput]:
    prompts = prompts or [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    return llm.generate(prompts, params, use_tqdm=False)


def finished_text(out: RequestOutput) -> str:
    completion = out.outputs[0]
    assert completion.finish_reason == "stop", (completion.finish_reason, completion.text)
    return completion.text


# --- every kind of constraint ---

@pytest.mark.parametrize("seed", SEEDS)
def test_json_schemas_validate_alone_and_mixed_with_unconstrained_requests(llm, closers, seed):
    names = list(SCHEMAS)
    schema_params = [constrained(closers, 1000 * seed + i, json=SCHEMAS[n]) for i, n in enumerate(names)]
    alone = run(llm, schema_params)
    for name, out in zip(names, alone):
        validate(SCHEMAS[name], finished_text(out))

    free_params = [free(500 + 10 * seed + i) for i in range(6)]
    free_prompts = [f"{p} and" for p in PROMPTS] + ["MERCUTIO:", "Nurse:"]
    free_alone = run(llm, free_params, free_prompts)
    # Unconstrained requests between, before and after the constrained ones.
    order = [("free", 0), *[("json", i) for i in range(7)], ("free", 1), ("free", 2),
             *[("json", i) for i in range(7, 20)], ("free", 3), ("free", 4), ("free", 5)]
    schema_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    mixed = run(llm, [(free_params if kind == "free" else schema_params)[i] for kind, i in order],
                [(free_prompts if kind == "free" else schema_prompts)[i] for kind, i in order])
    for (kind, i), out in zip(order, mixed):
        if kind == "free":
            assert out.outputs[0].token_ids == free_alone[i].outputs[0].token_ids, f"free request {i} changed"
            assert len(out.outputs[0].token_ids) == 24
        else:
            validate(SCHEMAS[names[i]], finished_text(out))
            # Seeded and batch invariant: the grammar's neighbours do not change its draws either.
            assert out.outputs[0].token_ids == alone[i].outputs[0].token_ids, names[i]


def test_a_bitmask_filled_while_the_step_before_finishes_gives_the_tokens_of_one_filled_at_sampling(
        llm, closers, monkeypatch):
    names = list(SCHEMAS)[:8]
    params = [constrained(closers, 77 + i, json=SCHEMAS[n]) for i, n in enumerate(names)]
    runner, started = llm.core.runner, []
    start_fill = runner.start_fill
    monkeypatch.setattr(runner, "start_fill",
                        lambda out, step, accept=None: started.append(step) or start_fill(out, step, accept))
    early = run(llm, params)
    assert len(started) > 10  # async scheduling: most decode steps' masks are started early
    monkeypatch.setattr(runner, "start_fill", lambda out, step, accept=None: False)  # every mask filled at sampling
    late = run(llm, params)
    for name, a, b in zip(names, early, late):
        validate(SCHEMAS[name], finished_text(a))
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, name


def test_the_next_fill_runs_while_the_tokens_are_appended_and_the_rows_built(llm, closers, monkeypatch):
    """With async scheduling the next step's bitmask starts filling before the step's tokens are
    appended (the grammars take them first), and a late sampling builds its rows and metadata
    before it waits for that fill: the fill is the constrained step's longest host work."""
    runner, core = llm.core.runner, llm.core
    at_update, at_build = [], []
    update, build = core.scheduler.update_after_step, runner.sampling_metadata.build

    def timed_update(out, tokens, *args, **kwargs):
        if "bitmask" in vars(runner):
            at_update.append(runner.bitmask._filling)
        return update(out, tokens, *args, **kwargs)

    def timed_build(rows, *args, **kwargs):
        at_build.append("bitmask" in vars(runner) and runner.bitmask._filling)
        return build(rows, *args, **kwargs)

    monkeypatch.setattr(core.scheduler, "update_after_step", timed_update)
    monkeypatch.setattr(runner.sampling_metadata, "build", timed_build)
    outs = run(llm, [constrained(closers, 300 + i, json=SCHEMAS["nested"]) for i in range(4)])
    for out in outs:
        validate(SCHEMAS["nested"], finished_text(out))
    assert sum(at_update) > 10 and sum(at_build) > 10, (sum(at_update), sum(at_build))



def test_no_matcher_is_asked_while_the_bitmask_fills_it(llm, closers, monkeypatch):
    """xgrammar moves a matcher through candidate tokens while it fills: the engine's thread asks
    a matcher (is_completed, for min_tokens) only after waiting for the fill, and requests with
    bad words (whose banned ids are worked out every step) do not ask it at all."""
    from dataclasses import replace

    from structured import RequestGrammar

    runner, asked = llm.core.runner, []
    completed = RequestGrammar.is_completed

    def watched(grammar):
        asked.append("bitmask" in vars(runner) and runner.bitmask._filling)
        return completed.fget(grammar)

    monkeypatch.setattr(RequestGrammar, "is_completed", property(watched))
    params = [replace(constrained(closers, 500 + i, json=SCHEMAS["nested"]), bad_words=["zzz"]) for i in range(3)]
    params.append(replace(constrained(closers, 600, json=SCHEMAS["nested"]), min_tokens=6))
    outs = run(llm, params)
    for out in outs:
        validate(SCHEMAS["nested"], finished_text(out))
    assert asked and not any(asked), asked  # asked for min_tokens only, never mid-fill

def test_compact_json_has_no_free_whitespace(llm, closers):
    outs = run(llm, [constrained(closers, s, json=SCHEMAS["nested"]) for s in range(4)])
    for out in outs:
        text = finished_text(out)
        validate(SCHEMAS["nested"], text)
        outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text).replace(", ", ",").replace(": ", ":")
        assert not re.search(r"\s", outside), text


def test_regex_outputs_fullmatch(llm, closers):
    params = [constrained(closers, 10 * seed + i, max_tokens=120, regex=r)
              for seed in SEEDS for i, r in enumerate(REGEXES)]
    for p, out in zip(params, run(llm, params)):
        regex = p.structured_outputs.regex
        assert re.fullmatch(regex, finished_text(out)), (regex, out.outputs[0].text)


def test_choice_returns_one_of_the_choices(llm, closers):
    params = [constrained(closers, 10 * seed + i, max_tokens=40, choice=c)
              for seed in SEEDS for i, c in enumerate(CHOICES)]
    texts = [finished_text(out) for out in run(llm, params)]
    for p, text in zip(params, texts):
        assert text in p.structured_outputs.choice
    assert len(set(texts)) > 3  # the model does choose, not always the first


def test_ebnf_arithmetic_outputs_parse(llm, closers):
    # This model loves dashes (unary minus); numbers and a weaker eos give expressions that end.
    bias = {**closers, **token_bias(llm.tokenizer, str.isdigit, 4.0), **{eos: 2.0 for eos in llm.core.eos_token_ids}}
    outs = run(llm, [constrained(bias, seed, max_tokens=200, grammar=ARITHMETIC) for seed in range(6)])
    texts = [finished_text(out) for out in outs]
    for text in texts:
        parse_arithmetic(text)
    assert any(op in "".join(texts) for op in "+-*/")


def test_json_object_yields_an_object(llm, closers):
    for out in run(llm, [constrained(closers, seed, json_object=True) for seed in range(6)]):
        assert isinstance(json.loads(finished_text(out)), dict)


def test_n3_with_a_schema_gives_three_valid_outputs(llm, closers):
    schema = SCHEMAS["any_of_objects"]
    params = constrained(closers, 7, json=schema)
    params.n = 3
    [out] = run(llm, [params])
    assert [c.index for c in out.outputs] == [0, 1, 2]
    texts = []
    for completion in out.outputs:
        assert completion.finish_reason == "stop"
        validate(schema, completion.text)
        texts.append(completion.text)
    assert len(set(texts)) > 1  # three samples, not one copied


def test_stop_string_inside_the_grammar_ends_the_request(llm, closers):
    params = constrained(closers, 3, regex=r"[a-z]{3}-[a-z]{3}", max_tokens=40)
    params.stop = ["-"]
    [out] = run(llm, [params])
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == "-"
    assert re.fullmatch(r"[a-z]{3}", completion.text), completion.text


def test_grammar_ends_the_request_even_with_ignore_eos(llm, closers):
    params = constrained(closers, 4, choice=["yes", "no"], max_tokens=30)
    params.ignore_eos = True
    [out] = run(llm, [params])
    assert finished_text(out) in ("yes", "no")
    assert len(out.outputs[0].token_ids) < 30


def test_min_tokens_with_a_grammar_that_completes_early_never_masks_a_whole_row(llm, closers, monkeypatch):
    """Once the grammar allows only eos, min_tokens must not ban it too: that row would be all -inf."""
    runner = llm.core.runner
    sample = runner.sampler
    rows_seen = []

    def checked(logits, md, constrain=None):
        out = sample(logits, md, constrain)  # the logits are masked in place
        rows_seen.append(torch.isfinite(logits).any(dim=-1))
        return out

    monkeypatch.setattr(runner, "sampler", checked)
    params = [constrained(closers, seed, max_tokens=20, choice=["yes", "no"]) for seed in range(3)]
    params += [constrained(closers, seed, max_tokens=60, json={"type": "boolean"}) for seed in range(3)]
    for p in params:
        p.min_tokens = 10
    outs = run(llm, params)
    for p, out in zip(params, outs):
        text = finished_text(out)
        assert text in ("yes", "no") if p.structured_outputs.choice else text in ("true", "false")
        assert len(out.outputs[0].token_ids) < 10  # the grammar ended it before min_tokens
    assert rows_seen and all(bool(r.all()) for r in rows_seen), "a row had every token masked"


def test_format_date_allows_only_real_calendar_days(llm, closers):
    from structured import RequestGrammar

    schema = {"type": "string", "format": "date"}
    compiled = llm.core.grammars.compile_sync(StructuredOutputsParams(json=schema))

    def accepts(day: str) -> bool:
        grammar = RequestGrammar(compiled)
        return grammar.accept_tokens(llm.tokenizer.encode(json.dumps(day), add_special_tokens=False)) \
            and grammar.is_completed

    for day in ("2024-02-29", "2000-02-29", "2023-12-31", "0001-01-01", "1811-11-30"):
        assert accepts(day), day
    for day in ("2023-02-29", "1900-02-29", "2023-02-30", "1811-11-31", "2023-04-31", "0000-01-01", "2023-13-01"):
        assert not accepts(day), day
    for out in run(llm, [constrained(closers, seed, max_tokens=40, json=schema) for seed in range(12)]):
        validate(schema, finished_text(out))


def test_gumbel_noise_is_finite_at_the_top_of_the_hash_range():
    """This (key, token) hashes to the largest 24-bit value: its noise was +inf, so it beat every
    other token whatever its logit, and a masked (-inf) row came out NaN with the token sampled."""
    noise = gumbel_noise_reference(torch.tensor([5947653659478147127]), torch.tensor([[1275]]))
    assert torch.isfinite(noise).all()


def test_masked_tokens_are_never_sampled_by_the_seed_that_once_hit_infinite_noise(llm, closers):
    # The "refs" schema, seed 12, used to sample a token its grammar forbade (the case above).
    params = SamplingParams(temperature=1.0, seed=12, max_tokens=80, structured_outputs=StructuredOutputsParams(
        json=SCHEMAS["refs"], disable_any_whitespace=True))
    [out] = run(llm, [params], ["ROMEO:"])
    completion = out.outputs[0]
    assert completion.finish_reason in ("stop", "length"), completion.finish_reason  # never "error"
    if completion.finish_reason == "stop":
        validate(SCHEMAS["refs"], completion.text)


# --- bad constraints ---

BAD = [
    (dict(json={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
     "structured_outputs.json: invalid JSON schema"),
    (dict(json='{"type": "object",'), "structured_outputs.json: not valid JSON"),
    (dict(json={"type": "foo"}), 'Unsupported type "foo"'),
    (dict(regex="[a-z"), "structured_outputs.regex: invalid regex"),
    (dict(regex="(ab"), "structured_outputs.regex: invalid regex"),
    (dict(grammar="root ::= missing"),
     'structured_outputs.grammar: invalid EBNF grammar: .*Rule "missing" is not defined'),
    (dict(grammar="root ::= ("), "structured_outputs.grammar: invalid EBNF grammar"),
]


@pytest.mark.parametrize("structured, message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_constraint_is_a_value_error_from_llm_generate(llm, closers, structured, message):
    good = constrained(closers, 1, choice=["ay", "nay"])
    bad = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(**structured))
    with pytest.raises(ValueError, match=message):
        llm.generate(["ROMEO:", "JULIET:"], [good, bad], use_tqdm=False)  # the good one is aborted
    [out] = run(llm, [good])  # and the engine goes on
    assert finished_text(out) in ("ay", "nay")


async def final_output(engine: AsyncEngine, prompt: str, params: SamplingParams) -> RequestOutput:
    return [out async for out in engine.generate(prompt, params)][-1]


async def test_constrained_request_joining_a_busy_async_engine_gives_the_offline_tokens(engine, llm, closers):
    params = constrained(closers, 21, json=SCHEMAS["object_array"])
    [offline] = run(llm, [params], ["ROMEO:"])
    busy = [asyncio.create_task(final_output(engine, p, free(30 + i))) for i, p in enumerate(PROMPTS)]
    start = engine.core.num_steps
    while engine.core.num_steps < start + 3:  # the others are mid-generation (running ahead)
        await asyncio.sleep(0.001)
    joined = await asyncio.wait_for(final_output(engine, "ROMEO:", params), TIMEOUT)
    outs = await asyncio.wait_for(asyncio.gather(*busy), TIMEOUT)
    assert [len(o.outputs[0].token_ids) for o in outs] == [24] * len(PROMPTS)
    validate(SCHEMAS["object_array"], finished_text(joined))
    assert joined.outputs[0].token_ids == offline.outputs[0].token_ids


async def test_bad_constraint_fails_its_async_request_alone(engine, closers):
    final = functools.partial(final_output, engine)
    busy = [asyncio.create_task(final(p, free(40 + i))) for i, p in enumerate(PROMPTS)]
    busy.append(asyncio.create_task(final("ROMEO:", constrained(closers, 2, json=SCHEMAS["flat"]))))
    start = engine.core.num_steps
    while engine.core.num_steps < start + 2:  # the others are mid-generation
        await asyncio.sleep(0.001)
    for structured, message in BAD:
        bad = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(**structured))
        with pytest.raises(ValueError, match=message):
            await asyncio.wait_for(final("JULIET:", bad), TIMEOUT)
    outs = await asyncio.wait_for(asyncio.gather(*busy), TIMEOUT)
    assert [len(o.outputs[0].token_ids) for o in outs[:-1]] == [24] * len(PROMPTS)
    validate(SCHEMAS["flat"], finished_text(outs[-1]))
    await wait_until_idle(engine)


# --- the grammar cache and the event loop ---

def test_second_request_with_the_same_schema_does_not_compile_again(llm, closers):
    schema = {"type": "object", "required": ["k", "n"],
              "properties": {"k": {"type": "string", "maxLength": 5}, "n": {"type": "integer", "minimum": 41}}}
    grammars = llm.core.grammars
    before = grammars.num_compiles
    validate(schema, finished_text(run(llm, [constrained(closers, 1, json=schema)])[0]))
    assert grammars.num_compiles == before + 1
    # The same schema again, and with its keywords in another order: one grammar, from the cache.
    reordered = {"required": ["k", "n"], "properties": schema["properties"], "type": "object"}
    hits = grammars.num_cache_hits
    outs = run(llm, [constrained(closers, 2, json=schema), constrained(closers, 3, json=json.dumps(reordered))])
    for out in outs:
        validate(schema, finished_text(out))
    assert grammars.num_compiles == before + 1 and grammars.num_cache_hits == hits + 2
    # Another whitespace setting is another grammar (its output need not end: whitespace galore).
    run(llm, [constrained(closers, 4, json=schema, disable_any_whitespace=False, max_tokens=8)])
    assert grammars.num_compiles == before + 2


async def test_async_requests_share_one_compile(engine, closers):
    schema = {"type": "object", "required": ["w"], "properties": {"w": {"enum": ["thee", "thou", "thy"]}}}

    async def text(seed: int) -> str:
        return finished_text([o async for o in engine.generate("ROMEO:", constrained(closers, seed, json=schema))][-1])

    await engine.compile_grammar(StructuredOutputsParams(json_object=True))  # the compiler exists
    before = engine.core.grammars.num_compiles
    texts = await asyncio.wait_for(asyncio.gather(*(text(s) for s in range(5))), TIMEOUT)
    for t in texts:
        validate(schema, t)
    assert engine.core.grammars.num_compiles == before + 1  # five requests at once, one compile


async def test_event_loop_keeps_running_while_the_compiler_is_made_and_a_grammar_compiles(closers, monkeypatch):
    """The first structured request builds the compiler (xgrammar's vocabulary tables) and every new
    grammar compiles: both in worker threads. Each is made slow here; a ticker must keep ticking."""
    from structured.compiler import GrammarCompilerService

    engine = AsyncEngine.from_engine_args(EngineArgs(**ENGINE))
    slow_threads = []
    make, compile_uncached = GrammarCompilerService.__init__, GrammarCompilerService._compile_uncached

    def slow_make(self, *args, **kwargs):
        slow_threads.append(threading.current_thread())
        time.sleep(0.3)
        make(self, *args, **kwargs)

    def slow_compile(self, spec):
        slow_threads.append(threading.current_thread())
        time.sleep(0.3)
        return compile_uncached(self, spec)

    monkeypatch.setattr(GrammarCompilerService, "__init__", slow_make)
    monkeypatch.setattr(GrammarCompilerService, "_compile_uncached", slow_compile)
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    try:
        start = time.perf_counter()
        outs = [o async for o in engine.generate("ROMEO:", constrained(closers, 5, json=SCHEMAS["enum_strings"]))]
        elapsed = time.perf_counter() - start
        validate(SCHEMAS["enum_strings"], finished_text(outs[-1]))
        assert engine.core.grammars.num_compiles == 1
        stop.set()
        await ticking
        main = threading.main_thread()
        assert len(slow_threads) == 2 and all(t is not main for t in slow_threads)
        assert elapsed > 0.6  # it did wait for both
        assert len(gaps) > 40 and max(gaps) < 0.15, f"the loop stalled for {max(gaps):.3f}s"
        await wait_until_idle(engine)
        assert_all_blocks_free(engine.core)
    finally:
        stop.set()
        await engine.shutdown()
        engine.core.grammars.close()
