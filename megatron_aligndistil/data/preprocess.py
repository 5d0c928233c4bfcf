"""Text preference data (UltraFeedback-binarized layout) -> tokenized JSONL (SPEC section 3).

For each record the tokenizer's chat template renders the conversation; the prompt is everything
up to and including the generation prompt (``<|im_start|>assistant\\n`` for Qwen), the response is
the rest up to and including the end-of-turn token (``<|im_end|>``). Prompt and response are
tokenized separately, as generation sees them, so ``decode(prompt_ids + response_ids)`` is the
chat-formatted text. Bad records (missing field, empty turn, wrong roles, chosen and rejected
with different prompts) are reported with their index and dropped (``strict`` raises instead);
records over the length limits are dropped and counted.

``chat_template_kwargs`` go to every ``apply_chat_template`` call (e.g. ``{"enable_thinking":
false}`` for Qwen3) and are recorded in ``<prefix>_report.json``; ``tools/generate.py`` and
``tools/eval_policy.py`` take the same value, or that report, so prompts are rendered at sampling
and evaluation time as they were for training (:func:`template_kwargs_arg`).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field

from ..core.errors import UserError, writing


class RecordError(UserError):
    pass


@dataclass
class Report:
    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)  # (index, reason) of the first problems
    chat_template_kwargs: dict = field(default_factory=dict)

    def add_drop(self, index: int, reason: str):
        self.dropped[reason.split(":")[0]] += 1
        if len(self.examples) < 20:
            self.examples.append((index, reason))

    def summary(self) -> dict:
        return {"total": self.total, "kept": self.kept, "dropped": dict(self.dropped),
                "first_problems": [f"record {i}: {r}" for i, r in self.examples],
                "chat_template_kwargs": self.chat_template_kwargs}


def template_kwargs_arg(value: str | None, flag: str = "--chat-template-kwargs") -> dict:
    """The chat-template arguments a flag gives: a JSON object (``'{"enable_thinking": false}'``)
    or the path of a preprocessing ``*_report.json`` (the arguments the data was rendered with)."""
    if not value:
        return {}
    if os.path.isfile(value):
        try:
            obj = json.load(open(value)).get("chat_template_kwargs")
        except (json.JSONDecodeError, AttributeError):
            obj = None
        if not isinstance(obj, dict):
            raise UserError(f"{flag} {value}: not a preprocessing report with 'chat_template_kwargs'")
        return obj
    from .records import parse_json_object

    return parse_json_object(value, f"{flag} (not a file)", "a JSON object is needed, e.g. "
                             "'{\"enable_thinking\": false}'", error=UserError)


def unread_template_kwargs(tokenizer, kwargs: dict) -> list[str]:
    """The keys of ``kwargs`` that the tokenizer's chat template never reads (jinja2's meta API:
    the template's undeclared variables): such an argument does nothing."""
    template = getattr(tokenizer, "chat_template", None)
    if not kwargs or not isinstance(template, str):
        return []
    import jinja2
    from jinja2 import meta

    read = meta.find_undeclared_variables(jinja2.Environment().parse(template))
    return sorted(k for k in kwargs if k not in read)


def warn_unread_template_kwargs(tokenizer, kwargs: dict, flag: str = "--chat-template-kwargs") -> list[str]:
    """Print one warning per launch (rank 0 of a distributed job) naming the ``kwargs`` keys the
    chat template never reads; returns them (on every rank)."""
    unread = unread_template_kwargs(tokenizer, kwargs)
    import torch.distributed as dist

    if unread and not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        import sys

        print(f"warning: {flag}: the chat template never reads {', '.join(map(repr, unread))}; "
              f"{'it has' if len(unread) == 1 else 'they have'} no effect (a misspelt name?)", file=sys.stderr,
              flush=True)
    return unread


def load_records(source: str, split: str = "train_prefs"):
    """Records from a local JSON/JSONL/Parquet file, a ``save_to_disk`` directory, or a hub name."""
    if os.path.isfile(source):
        if source.endswith((".jsonl", ".json")):
            with open(source) as f:
                head = f.read(1)
                f.seek(0)
                if head == "[":
                    try:
                        return json.load(f)
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{source}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") \
                            from None
                records = []
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{source}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") \
                            from None
                return records
        import datasets

        return datasets.load_dataset("parquet", data_files=source, split="train")
    import datasets

    if os.path.isdir(source):
        ds = datasets.load_from_disk(source)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    from ..hub import local_or_hub

    source = local_or_hub(source, "--input", repo_type="dataset")  # offline and uncached: refused at once
    return datasets.load_dataset(source, split=split)  # e.g. HuggingFaceH4/ultrafeedback_binarized


def _check_conversation(messages, name: str):
    if not isinstance(messages, list) or len(messages) < 2:
        raise RecordError(f"field {name!r} must be a list of at least 2 messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"field {name!r} message {i} lacks 'role' or 'content'")
        if not isinstance(m["content"], str):
            kind = "null" if m["content"] is None else type(m["content"]).__name__
            raise RecordError(f"content not a string: field {name!r} message {i} ({m['role']}) has {kind} content"
                              + (" (OpenAI-style parts: join their text first)" if kind == "list" else ""))
        if not m["content"].strip():
            raise RecordError(f"empty turn: field {name!r} message {i} ({m['role']}) is empty")
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if body != expected[: len(body)] or body[-1] != "assistant":
        raise RecordError(f"wrong roles: field {name!r} has roles {roles} (want [system,] user, assistant, ..., "
                          "ending with assistant)")


def id_space(tokenizer) -> int:
    """The tokenizer's largest id + 1 (added tokens included): the ids its output can hold. Not
    ``len(tokenizer)``, which counts tokens and is smaller when the ids have gaps."""
    return max(tokenizer.get_vocab().values()) + 1


def _check_preference(rec: dict) -> None:
    """A pair must state a preference: responses that differ and, where the record carries
    UltraFeedback's ``score_chosen`` / ``score_rejected``, a chosen score above the rejected one
    (a tie or an inverted pair would teach DPO nothing, or the opposite)."""
    if rec["chosen"][-1]["content"] == rec["rejected"][-1]["content"]:
        raise RecordError("no preference: the chosen and rejected responses are identical")
    if "score_chosen" not in rec or "score_rejected" not in rec:
        return
    chosen, rejected = rec["score_chosen"], rec["score_rejected"]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (chosen, rejected)):
        raise RecordError(f"bad score: score_chosen {chosen!r} / score_rejected {rejected!r} must be finite numbers")
    if chosen == rejected:
        raise RecordError(f"tie: score_chosen equals score_rejected ({chosen!r})")
    if chosen < rejected:
        raise RecordError(f"inverted pair: score_chosen {chosen!r} is below score_rejected {rejected!r}")


def split_conversation(tokenizer, messages, chat_template_kwargs: dict | None = None):
    """(prompt_ids, response_ids) of a conversation whose last turn is the response."""
    kwargs = chat_template_kwargs or {}
    try:
        prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True,
                                                    **kwargs)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - jinja raises its own types for records it cannot render
        raise RecordError(f"chat template failed: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not full_text.startswith(prompt_text):
        raise RecordError("chat template: the full conversation does not start with the prompt rendering")
    response_text = full_text[len(prompt_text):]
    eot = tokenizer.eos_token
    cut = response_text.rfind(eot)
    if cut < 0:
        raise RecordError(f"chat template: the response does not end with the end-of-turn token {eot!r}")
    response_text = response_text[: cut + len(eot)]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids


def preprocess(records, tokenizer, output_prefix: str, max_prompt_length: int = 1024,
               max_length: int = 2048, strict: bool = False, progress: bool = True,
               chat_template_kwargs: dict | None = None) -> Report:
    """Write ``<prefix>_pairs.jsonl`` (DPO), ``<prefix>_chosen.jsonl`` (off-policy distillation/SFT)
    and ``<prefix>_prompts.jsonl`` (on-policy), and the same records as Megatron indexed datasets
    ``<prefix>_{pairs,chosen,prompts}.bin/.idx`` (``--data-path <prefix>_pairs``, no extension).
    Returns the report (also ``<prefix>_report.json``). A write that fails (disk full, read-only)
    removes the temporaries and names --output-prefix."""
    report = Report(chat_template_kwargs=dict(chat_template_kwargs or {}))
    warn_unread_template_kwargs(tokenizer, report.chat_template_kwargs)
    paths = {k: f"{output_prefix}_{k}.jsonl" for k in ("pairs", "chosen", "prompts")}
    temporaries = [p + ".tmp" for p in paths.values()] + [f"{output_prefix}_{k}{ext}.tmp" for k in paths
                                                          for ext in (".bin", ".idx")]
    with writing("--output-prefix", output_prefix, cleanup=temporaries):
        _write_outputs(records, tokenizer, output_prefix, paths, report, max_length, max_prompt_length, strict,
                       progress)
    return report


def _write_outputs(records, tokenizer, output_prefix, paths, report, max_length, max_prompt_length, strict,
                   progress):
    """The body of :func:`preprocess`: tokenize, validate, write the temporaries, publish."""
    from tqdm import tqdm

    from .indexed import IndexedWriter

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    files = {k: open(p + ".tmp", "w") for k, p in paths.items()}
    ids = id_space(tokenizer)
    indexed = {k: IndexedWriter(f"{output_prefix}_{k}", kind, ids)
               for k, kind in (("pairs", "dpo"), ("chosen", "distill"), ("prompts", "prompt"))}
    try:
        for index, rec in enumerate(tqdm(records, disable=not progress, desc="tokenize", unit="rec")):
            report.total += 1
            try:
                if not isinstance(rec, dict):
                    raise RecordError(f"not an object: a record is a JSON object, got {type(rec).__name__}")
                for key in ("chosen", "rejected"):
                    if key not in rec or rec[key] is None:
                        raise RecordError(f"missing field {key!r}")
                    _check_conversation(rec[key], key)
                if rec["chosen"][:-1] != rec["rejected"][:-1]:
                    raise RecordError("chosen and rejected have different prompts")
                _check_preference(rec)
                prompt_ids, chosen_ids = split_conversation(tokenizer, rec["chosen"], report.chat_template_kwargs)
                _, rejected_ids = split_conversation(tokenizer, rec["rejected"], report.chat_template_kwargs)
                if len(prompt_ids) > max_prompt_length:
                    raise RecordError(f"prompt too long: {len(prompt_ids)} > {max_prompt_length} tokens")
                longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
                if longest > max_length:
                    raise RecordError(f"too long: {longest} > {max_length} tokens")
            except RecordError as exc:
                if strict:
                    raise RecordError(f"record {index}: {exc}") from None
                report.add_drop(index, str(exc))
                continue
            report.kept += 1
            out = {"pairs": {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids},
                   "chosen": {"prompt_ids": prompt_ids, "response_ids": chosen_ids},
                   "prompts": {"prompt_ids": prompt_ids}}
            for k, record in out.items():
                files[k].write(json.dumps(record) + "\n")
                indexed[k].add(record)
    except BaseException:
        for writer in indexed.values():
            writer.abort()
        raise
    finally:
        for f in files.values():
            f.close()
    if report.kept == 0:  # nothing to train on: no empty outputs, a clear error instead
        for p in paths.values():
            os.remove(p + ".tmp")
        for writer in indexed.values():
            writer.abort()
        hint = ""
        if any(r.startswith("chat template: the response does not end") for _, r in report.examples):
            hint = (f"; the tokenizer's eos_token {tokenizer.eos_token!r} is not the chat template's end-of-turn "
                    "token: a base model's tokenizer? Use the instruct/chat model's tokenizer")
        raise RecordError(f"no record kept of {report.total}: dropped {dict(report.dropped)}, e.g. "
                          + "; ".join(f"record {i}: {r}" for i, r in report.examples[:3]) + hint)
    for k, p in paths.items():
        os.replace(p + ".tmp", p)
        indexed[k].commit()
    with open(f"{output_prefix}_report.json", "w") as f:
        json.dump(report.summary(), f, indent=2)

