"""LLM: offline batches on the synchronous EngineCore, with a tqdm bar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from sampling.params import RequestOutputKind, SamplingParams

from .config import EngineArgs
from .engine_core import EngineCore, PromptType
from .outputs import RequestOutput


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.core = EngineCore(self.engine_args.create_engine_config())
        self.tokenizer = self.core.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.core.default_sampling_params()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of the prompts."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        order: dict[str, int] = {}
        try:
            for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
                params = params.clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY
                samples = self.core.add_request(None, prompt, params, priority[i] if priority else 0)
                order[samples[0].parent_id] = i
            results: list[RequestOutput | None] = [None] * len(prompts)
            with tqdm(total=len(prompts), desc="Processed prompts", disable=not use_tqdm) as bar:
                while self.core.has_unfinished:
                    for out in self.core.step():
                        if out.finished:
                            results[order[out.request_id]] = out
                            bar.update(1)
        except BaseException:
            for request_id in order:
                self.core.abort(request_id)
            raise
        return results  # type: ignore[return-value]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.core.render_chat(c, **(chat_template_kwargs or {}))} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)
