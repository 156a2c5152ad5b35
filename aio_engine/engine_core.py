"""EngineCore: one synchronous engine (tokenizer, scheduler, KV-cache manager, runner, outputs).

A step is three calls so that the async engine can run the middle one off the event loop:
`schedule()` (cheap, on the loop), `execute()` (the forward and sampling; blocks), and
`finish_step()` (tokens -> requests -> outputs). `step()` chains them for the offline LLM.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace
from typing import Any

from sampling.params import SamplingParams

from .config import EngineConfig
from .kv_cache import KVCacheManager
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .outputs import RequestOutput
from .request import Request, RequestStatus
from .scheduler import Scheduler, SchedulerOutput
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model
        self.tokenizer = load_tokenizer(mc.tokenizer, mc.tokenizer_mode) if mc.tokenizer else None
        self.runner = ModelRunner(config)
        num_blocks = self.runner.determine_num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                                 config.cache.hash_algo)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.outputs = OutputProcessor(self.tokenizer, config.scheduler.stream_interval)
        self.eos_token_ids = self._eos_ids()
        self._ids = itertools.count()
        # Counters for metrics and tests.
        self.num_prompt_tokens_computed = 0
        self.num_generated_tokens = 0
        self.num_steps = 0
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, config.cache.block_size,
                    num_blocks * self.runner.bytes_per_block() / 2**20)

    def _eos_ids(self) -> tuple[int, ...]:
        ids = list(self.config.model.generation_defaults.get("_eos_token_ids", ()))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))

    # --- requests ---
    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams carrying the model's generation-config defaults."""
        defaults = {k: v for k, v in self.config.model.generation_defaults.items() if not k.startswith("_")}
        return SamplingParams(**defaults)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, list):
            return None, list(prompt)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer (the engine runs with --skip-tokenizer-init)")
        return prompt, self.tokenizer(prompt).input_ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (the engine runs with --skip-tokenizer-init)")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **kwargs)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0, prompt_token_ids: list[int] | None = None) -> Request:
        """Validate and queue a request; raises ValueError for anything the engine cannot serve."""
        params = self.default_sampling_params() if params is None else params
        if params.n != 1:
            raise ValueError("n > 1 is not supported yet")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if prompt_token_ids is None:
            text, prompt_token_ids = self.tokenize_prompt(prompt)
        else:
            text = prompt if isinstance(prompt, str) else None
        mc = self.config.model
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < mc.vocab_size)]
        if bad:
            raise ValueError(f"prompt token ids outside [0, {mc.vocab_size}): {bad[:5]}")
        params.validate_for_model(mc.vocab_size, mc.max_logprobs)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the engine runs with --skip-tokenizer-init)")
        if params.max_tokens is None:
            params = replace(params, max_tokens=max(1, mc.max_model_len - len(prompt_token_ids)))
        request = Request(request_id, prompt_token_ids, params, self.eos_token_ids, priority)
        self.scheduler.add_request(request)
        self.outputs.add(request, text)
        return request

    def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> RequestOutput | None:
        """End a request now and free its blocks; its final output, or None for unknown ids."""
        request = self.scheduler.finish_request(request_id, status)
        return self.outputs.finish_external(request) if request is not None else None

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # --- the step ---
    def schedule(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        now = time.monotonic()
        for sched in out.scheduled:
            if sched.request.first_scheduled_time is None:
                sched.request.first_scheduled_time = now
            if sched.request.num_computed_tokens < sched.request.num_prompt_tokens:
                self.num_prompt_tokens_computed += min(
                    sched.num_new_tokens, sched.request.num_prompt_tokens - sched.request.num_computed_tokens)
        return out

    def execute(self, out: SchedulerOutput) -> list[int | None]:
        return self.runner.execute(out)

    def finish_step(self, out: SchedulerOutput, sampled: list[int | None]) -> list[RequestOutput]:
        self.num_steps += 1
        changed = self.scheduler.update_after_step(out, sampled)
        self.num_generated_tokens += len(changed)
        return self.outputs.process(changed, self.scheduler.finish_request)

    def step(self) -> list[RequestOutput]:
        out = self.schedule()
        if out.empty:
            return []
        return self.finish_step(out, self.execute(out))

    def fail_all(self) -> list[str]:
        """After an error in a step: finish every request and free its blocks; their ids."""
        ids = list(self.scheduler.requests)
        for request_id in ids:
            self.abort(request_id, RequestStatus.FINISHED_ERROR)
        return ids
