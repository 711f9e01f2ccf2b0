"""Decoding constrained to the task's answers.

Every field of the task's answer takes one value from a list (the schema's ``enum``), so
the answers the schema allows can be listed: for the demo task 8 intents x 4 priorities x
the articles. Each is written as training wrote gold answers (compact JSON in the task's
field order, ``components.task.dump_answer``) and tokenized as the chat template tokenizes
an assistant turn; the token sequences form a trie. At each decoding step a constrained
row may only take a token that continues some allowed answer (its other logits are set to
-inf), so a greedy answer is the model's most likely *valid* answer: no invalid JSON, no
unknown label, whatever the ticket says (a prompt injection included).
"""
from __future__ import annotations

import itertools
import math

from components.lm import prompt_ids
from components.task import AnswerSchema, dump_answer

END = -1  # a trie key: an allowed answer ends here
MAX_ANSWERS = 100_000  # beyond this many allowed answers, answers are validated, not constrained


class AnswerConstraint:
    """The allowed answers as a trie of token ids; :meth:`allowed` gives the next tokens."""

    def __init__(self, sequences: list[list[int]], end_token: int):
        self.root: dict = {}
        for ids in sequences:
            node = self.root
            for token in ids:
                node = node.setdefault(token, {})
            node[END] = {}
        self.end_token, self.answers = end_token, len(sequences)

    @classmethod
    def build(cls, tokenizer, schema: AnswerSchema) -> "AnswerConstraint":
        """From the schema's enums; ValueError when a field has no list of values or there
        are more than MAX_ANSWERS answers."""
        enums = [schema.values(f) for f in schema.fields]
        missing = [f for f, values in zip(schema.fields, enums) if not values]
        if missing:
            raise ValueError(f"answer field(s) {', '.join(missing)} take any string: answers are validated only")
        count = math.prod(len(values) for values in enums)
        if count > MAX_ANSWERS:
            raise ValueError(f"{count:,} possible answers (over {MAX_ANSWERS:,}): answers are validated only")
        chat = [{"role": "user", "content": "?"}]
        start = len(prompt_ids(chat, tokenizer))
        end = tokenizer.eos_token_id
        sequences = []
        for combo in itertools.product(*enums):
            text = dump_answer(dict(zip(schema.fields, combo)), schema.fields)
            ids = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": text}])[start:]
            sequences.append(ids[:ids.index(end)] if end in ids else ids)
        return cls(sequences, end)

    def allowed(self, generated: list[int]) -> list[int] | None:
        """Token ids that may follow ``generated``; None when ``generated`` left the trie
        (a finished row's padding): no constraint then."""
        node = self.root
        for token in generated:
            if token not in node:
                return None
            node = node[token]
        nxt = [t for t in node if t != END]
        return nxt + [self.end_token] if END in node or not nxt else nxt


class ConstrainRows:
    """A transformers logits processor for one batch: rows whose request carries a
    constraint may only take the tokens it allows."""

    def __init__(self, constraints: list[AnswerConstraint | None], prompt_length: int):
        self.constraints, self.start = constraints, prompt_length

    def __call__(self, input_ids, scores):
        for row, constraint in enumerate(self.constraints):
            if constraint is None:
                continue
            allowed = constraint.allowed(input_ids[row, self.start:].tolist())
            if allowed is None:
                continue
            keep = scores[row, allowed].clone()
            scores[row] = float("-inf")
            scores[row, allowed] = keep
        return scores
