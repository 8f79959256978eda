"""fournil's engine behind lm-evaluation-harness: an ``LM`` that scores and generates with any model fournil loads.

Registered in lm-eval as ``fournil`` once this module is imported: ``fournil bench`` uses it, Python can
(``lm_eval.simple_evaluate(model="fournil", model_args="model=runs/x")``), and so can lm-eval's own command line
through ``python -m fournil.evaluate.harness --model fournil --model_args model=runs/x --tasks ...``. It tokenizes as
lm-eval's ``hf`` backend does (BOS first only for models that expect it, the end-of-text token before an empty
context, trailing spaces moved to the continuation), so that both score the same tokens:

- ``loglikelihood``: the choices of a question read their shared context once (a key/value cache they all go on
  from), in batches of about ``batch_tokens`` tokens, longest first; continuations are padded on the right (a
  causal model's earlier positions never see the padding), and only their positions go through the output layer;
- ``loglikelihood_rolling``: lm-eval's disjoint windows of the model's context, scored the same way;
- ``generate_until``: every request through the engine (:func:`complete`: continuous batching, ``max_batch``
  sequences at a time), greedy unless asked, ending at the stop strings or the end-of-text token; the prompt keeps
  its last tokens that leave room for the answer in the context, and at least half a context.
"""
from __future__ import annotations

import lm_eval.models  # noqa: F401 - lm-eval's own models first: it loads them only into an empty registry
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from fournil.errors import FournilError, typed
from fournil.generate import SamplingParams, complete
from fournil.generate.cache import half_context
from fournil.generate.engine import score_choices
from fournil.models.base import decoder_only


@register_model("fournil")
class FournilLM(TemplateLM):
    def __init__(self, model: str = "smollm2", device: str = "auto", dtype: str = "auto", batch_tokens: int = 1024,
                 max_gen_toks: int = 256, max_batch: int = 16, add_bos_token: bool | None = None, **unknown):
        from fournil.runs import Run

        if unknown:
            raise FournilError(f"the fournil model takes no {', '.join(sorted(unknown))}: its model_args are model, "
                               f"device, dtype, batch_tokens, max_gen_toks, max_batch, add_bos_token")
        super().__init__()
        self.run = Run.load(model, device, dtype)
        self.run.check_writes()
        if dtype == "bfloat16":  # weights cast once, as generation and lm-eval's hf backend do, not at every pass
            self.run.quantize(dtype)
        decoder_only(self.run.model, "benchmarking")
        if not hasattr(self.run.model, "new_cache"):
            raise FournilError(f"benchmarks read with a Transformer decoder (gpt, llama, a pretrained model); {model} is "
                               f"an {self.run.model.family} model: measure it on text with "
                               f"`fournil eval {typed(model)}`")
        self.tok, self.net = self.run.tokenizer, self.run.model
        self.batch_tokens, self.max_gen_toks, self.max_batch = int(batch_tokens), int(max_gen_toks), int(max_batch)
        self._eot = self.tok.eos_id if self.tok.eos_id is not None else self.tok.bos_id
        # as hf's add_bos_token: None, what the tokenizer does by default; lm-eval's API clients send no BOS
        self.add_bos = getattr(self.tok, "add_bos", False) if add_bos_token is None else \
            str(add_bos_token).lower() in ("true", "1")

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> FournilLM:
        """From lm-eval's command line: only ``--model_args`` count (its ``--device`` defaults to cuda on every
        machine; fournil picks the device itself unless ``model_args`` says ``device=``)."""
        return cls(**arg_dict)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> FournilLM:
        from lm_eval.utils import simple_parse_args_string

        return cls(**simple_parse_args_string(arg_string))

    # ---- what TemplateLM asks
    @property
    def eot_token_id(self) -> int:
        if self._eot is None:  # asked for only where a text is scored from its very start
            raise FournilError(f"{self.run.path} has no end-of-text token to put before a text it scores from the "
                               f"start; such tasks need a model trained with one (--tokenizer bpe:N, or a pretrained "
                               f"one). `fournil eval {typed(self.run.path)}` gives its bits per byte on its own "
                               f"held-out text")
        return self._eot

    @property
    def max_length(self) -> int:
        return self.net.config.block_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.run.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As the model's Hugging Face tokenizer encodes by default: BOS first if the model expects it."""
        try:
            ids = self.tok.encode(string)
        except FournilError as e:
            raise FournilError(f"{self.run.path} cannot read this task's text: {e}. Benchmarks need a tokenizer that "
                               f"reads any text: train with --tokenizer bpe:N, or bench a pretrained model") from None
        bos = self.tok.bos_id
        add = self.add_bos if add_special_tokens is None else add_special_tokens
        return [bos, *ids] if add and bos is not None and ids[:1] != [bos] else ids

    def chat_template(self, chat_template=False) -> str | None:
        return getattr(self.tok, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tok.chat_text(chat_history, add_generation_prompt)

    # ---- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding would write it) for each request.

        Requests whose tokens before the first scored one are the same (a multiple-choice question's choices) are
        packed in one row after that prefix, which is read once (:func:`score_choices`); rows longest first, in
        batches of about ``batch_tokens`` tokens. A continuation longer than the model's context is scored in parts
        of half the context, each read after the tokens before it that fill the context (so every token is predicted
        from at least half a context): its log-probability is theirs summed, and greedy decoding writes it if it
        writes each part."""
        parts, owners = [], []
        for i, (_, context, continuation) in enumerate(requests):
            whole = context + continuation
            size = self.max_length if len(continuation) <= self.max_length else half_context(self.max_length)
            for start in range(len(context), len(whole), size):
                parts.append((None, whole[:start], whole[start:start + size]))
                owners.append(i)
        groups: dict[tuple[int, ...], list[list[int]]] = {}
        rows = []
        for i, (_, context, continuation) in enumerate(parts):
            inp = (context + continuation)[-(self.max_length + 1):][:-1]
            cut = len(inp) - len(continuation) if len(inp) > len(continuation) else 0
            rows.append((inp[cut:], continuation))
            packs = groups.setdefault(tuple(inp[:cut]), [[]])
            if packs[-1] and len(inp) + sum(len(rows[j][0]) for j in packs[-1]) > self.max_length:
                packs.append([])  # what does not fit in the model's context goes in another row
            packs[-1].append(i)
        packs = sorted(((prefix, pack) for prefix, ps in groups.items() for pack in ps),
                       key=lambda p: -len(p[0]) - sum(len(rows[i][0]) for i in p[1]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="scoring", disable=disable_tqdm or None)  # None: on a terminal only
        while packs:
            width = len(packs[0][0]) + sum(len(rows[i][0]) for i in packs[0][1])
            batch = packs[:max(1, self.batch_tokens // width)]
            del packs[:len(batch)]
            scores = score_choices(self.net, [(list(p), [rows[i] for i in members]) for p, members in batch],
                                   self.run.measure_dtype)
            for pack, scored in zip(batch, scores):
                for i, result in zip(pack[1], scored):
                    results[i] = result
                bar.update(len(pack[1]))
        bar.close()
        totals = [(0.0, True)] * len(requests)
        for i, (logprob, greedy) in zip(owners, results):
            totals[i] = (totals[i][0] + logprob, totals[i][1] and greedy)
        return totals

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, 1)):
                windows.append(((None, None), context, predicted))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        return totals

    # ---- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            keep = max(self.max_length - new, half_context(self.max_length))  # (an answer as long as the context)
            prompts.append(self.tok_encode(context)[-keep:] or [self.eot_token_id])
            params.append(SamplingParams(max_new_tokens=new, temperature=temperature, stop=tuple(until), seed=1234))
        with tqdm(total=len(prompts), desc="generating", disable=disable_tqdm or None) as bar:
            done = complete(self.net, self.tok, prompts, params, self.run.dtype, max_batch=self.max_batch,
                            progress=lambda n: bar.update(n - bar.n))
        return [c.text for c in done]


if __name__ == "__main__":  # lm-eval's own command line, with `--model fournil` known
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
