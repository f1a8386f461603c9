"""generate: continue a prompt with a trained causal LM and the tokenizer saved with it.

Greedy decoding when the temperature is 0, sampling otherwise (the recipe passed a temperature
without ``do_sample`` and transformers silently ignored it). Generation stops at ``</s>``. A model
trained on conversations has a chat template in its tokenizer: the prompt is then rendered as a
customer message followed by the separator, so the continuation is the reply.

The sampling settings arrive validated (``job.Sampling``: the job's ``generate`` section with a
command's options or the chat page's fields over it); this module only applies them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from kantai_batch.data import encode_text
from kantai_batch.errors import InputDataError
from kantai_batch.job import Sampling
from kantai_batch.model import load_lm, load_lm_tokenizer, position_ids, trained_length, usable_positions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    prompt: str
    """The prompt as given."""
    texts: list[str]
    """Per returned sequence: the prompt (as the model read it, when a chat template applied) and its continuation."""
    continuations: list[str]
    """Per returned sequence: the generated text alone."""
    new_tokens: list[int]
    """Per returned sequence: tokens generated before the end-of-text token."""

    def as_json(self) -> dict[str, object]:
        single = len(self.texts) == 1
        return {
            "prompt": self.prompt,
            "text": self.texts[0] if single else self.texts,
            "new_tokens": self.new_tokens[0] if single else self.new_tokens,
        }


class Generator:
    """A causal LM and its tokenizer loaded once, ready for many prompts (chat keeps one per session);
    bench builds one on the model it has just trained."""

    def __init__(self, model, tokenizer, model_dir: Path | None = None, trained: int | None = None) -> None:
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.max_length = usable_positions(self.model.config)
        self.trained = trained

    @classmethod
    def load(cls, model_dir: Path, command: str = "generate") -> Generator:
        tokenizer = load_lm_tokenizer(model_dir, "clm", command)
        return cls(load_lm(model_dir, "clm"), tokenizer, model_dir, trained_length(model_dir))

    @property
    def answers(self) -> bool:
        """Whether the model was trained on conversations (and so answers a prompt rather than continuing it)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def __call__(self, prompt: str, sampling: Sampling, *, as_message: bool = True) -> Generation:
        import torch
        from transformers import set_seed

        use_template = bool(as_message and self.answers)
        ids, rendered = self._prompt_ids(prompt, use_template)
        stops = self._stops(use_template)
        config = self._generation_config(sampling, len(ids), stops)
        if sampling.seed is not None:
            set_seed(sampling.seed)
        inputs = torch.tensor([ids], device=self.model.device)
        with torch.inference_mode():
            output = self.model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                position_ids=position_ids(self.model.config, len(ids)).to(self.model.device),
                generation_config=config,
            )
        return self._generation(prompt, rendered, output[:, len(ids) :].tolist(), use_template, set(stops))

    def _prompt_ids(self, prompt: str, use_template: bool) -> tuple[list[int], str]:
        """The prompt's token ids (as the chat template renders it, with ``use_template``) and its text."""
        if not prompt.strip():
            raise InputDataError("the prompt is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputDataError(
                f"the prompt holds half a character (a lone surrogate, {prompt[exc.start]!r} at {exc.start}): not text"
            ) from None
        tok = self.tokenizer
        rendered = (
            tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False) if use_template else prompt
        )
        # As training read its text: special-token strings in it are characters, the separator the template
        # puts after the message excepted (one the user typed is text too: prepare leaves none in a tweet).
        separator = (getattr(tok, "extra_special_tokens", None) or [None])[0] if use_template else None
        if separator is not None and separator in rendered:
            message, _, after = rendered.rpartition(separator)
            pieces = encode_text(tok, [message, after])["ids"]
            ids = [tok.bos_token_id, *pieces[0], tok.convert_tokens_to_ids(separator), *pieces[1]]
        else:
            ids = [tok.bos_token_id, *encode_text(tok, [rendered])["ids"][0]]
        if len(ids) == 1 + (separator is not None):
            raise InputDataError("the prompt is empty once the model's tokenizer has cleaned it")
        return ids, rendered

    def _stops(self, use_template: bool) -> list[int]:
        """The tokens that end the text: ``</s>``; ``<s>``, which training only ever saw after ``</s>`` (a
        model that writes it has begun another example); and, for a reply, the separator (another turn)."""
        tok = self.tokenizer
        stops = [tok.eos_token_id, tok.bos_token_id]
        separator = (getattr(tok, "extra_special_tokens", None) or [None])[0] if use_template else None
        if separator is not None:
            stops.append(tok.convert_tokens_to_ids(separator))
        return list(dict.fromkeys(token for token in stops if token is not None))

    def _generation_config(self, sampling: Sampling, prompt_tokens: int, stops: list[int]):
        """``sampling`` as transformers' GenerationConfig, its new tokens cut to what fits after the prompt."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        room = self.max_length - prompt_tokens
        if room < 1:
            raise InputDataError(f"the prompt is {prompt_tokens} tokens; the model reads at most {self.max_length}")
        max_new = sampling.max_new_tokens
        if max_new > room:
            log.warning("generate: only %d tokens fit after the prompt (max-new-tokens %d)", room, max_new)
            max_new = room
        if self.trained and prompt_tokens + max_new > self.trained:
            # The positions past the trained blocks never had a gradient: what the model reads there is noise.
            log.warning(
                "generate: %d prompt tokens and up to %d new ones run past the %d tokens a block the model was "
                "trained on; expect the text beyond them to degrade",
                prompt_tokens,
                max_new,
                self.trained,
            )
        greedy = sampling.temperature == 0
        return GenerationConfig(
            max_new_tokens=max_new,
            do_sample=not greedy,
            num_return_sequences=sampling.num_return_sequences,
            bos_token_id=tok.bos_token_id,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
            **(
                {}
                if greedy
                else {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
            ),
        )

    def _generation(
        self, prompt: str, rendered: str, rows: list[list[int]], use_template: bool, stops: set[int]
    ) -> Generation:
        """The generated ``rows`` (new tokens only) as texts and continuations."""
        tok = self.tokenizer
        # A prompt continued as given may run into a reply: the separator stays visible between the two.
        extra = [] if use_template else getattr(tok, "extra_special_tokens", None) or []
        shown = set(tok.convert_tokens_to_ids(extra))
        texts, continuations, counts = [], [], []
        for row in rows:
            # Up to the first stop: dropped as special tokens, a <s> or separator inside glued words together.
            generated = next((row[:at] for at, token in enumerate(row) if token in stops), row)
            continuation = _decoded(tok, generated, shown)
            if use_template:
                # The reply's first token carries no leading space: it follows the separator token.
                continuation = continuation.strip()
                texts.append(f"{rendered.rstrip()} {continuation}")
            else:
                texts.append(prompt + continuation)
            continuations.append(continuation)
            counts.append(len(generated))
        return Generation(prompt=prompt, texts=texts, continuations=continuations, new_tokens=counts)


def _decoded(tok, ids: list[int], shown: set[int]) -> str:
    """``ids`` as text without special tokens, but those in ``shown``, which keep their text, spaced."""
    text, run = "", []
    for token in [*ids, None]:
        if token is not None and token not in shown:
            run.append(token)
            continue
        piece = tok.decode(run, skip_special_tokens=True)
        text = f"{text}{piece.lstrip()}" if text.endswith(" ") else f"{text}{piece}"
        if token is not None:
            text = f"{text.rstrip()} {tok.convert_ids_to_tokens(token)} "
        run = []
    return text
