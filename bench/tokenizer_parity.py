"""Token ids of a model folder's tokenizer under this venv's transformers and under other
Pythons' (e.g. a transformers 5.x venv, as an engine such as vLLM uses), each compared with
the folder's tokenizer.json read by `tokenizers` alone and with the first folder under this
Python (the baseline). Nothing is downloaded.

    .venv/bin/python bench/tokenizer_parity.py --python /path/to/tf5-venv/bin/python
    .venv/bin/python bench/tokenizer_parity.py --folder OLD --folder NEW --python A --python B

Texts: the pipeline's prepare/test.jsonl chats when they exist (else chats built from
generated tickets with the task's prompt builder, account weight unknown): the user
prompts and gold answers, and strings of unicode, whitespace and digits. Chats go through
apply_chat_template: with the generation prompt, with the answer, and without a system
message. The other Python needs only transformers, tokenizers and jinja2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EXTRA_TEXTS = [
    "", " ", "  leading and trailing  ", "\t\ttabs\tbetween\t", "line\r\nwindows\r\n", "\n\n\nnewlines\n\n",
    "trailing spaces   \n   ", "\u00a0no-break\u00a0space", "\u3000ideographic space",
    "0", "7", "42", "2026-08-26T04:50:32+00:00", "INV-20725 / KB-103 / TCK-000001", "+1 -1 +0 unknown",
    "3.14159265358979", "1,234,567.89", "0000000000123", "12345678901234567890", "v2.13.0+cpu",
    "Grüße aus Köln, ça va? Ñandú, æøå, İstanbul", "日本語のサポートチケット：ログインできません",
    "请帮我退款，谢谢", "한국어 문의입니다", "Привет, не работает вход", "مرحبا، لا أستطيع تسجيل الدخول",
    "שלום עולם", "ελληνικά κείμενα", "emoji 😀🚀👍🏽 and 👨‍👩‍👧", "e\u0301 combining, ﬁ ligature, Ａ full width",
    "\u200bzero\u200dwidth\ufeff", "a\x00b\x07c", "`code` {\"json\": [1, 2.5, null]} <b>html</b>",
    "literal <|im_end|> and <|im_start|>user in text", "<|endoftext|>", "    def f(x):\n        return x * 2\n",
]


def worker(folder: str, inputs: str, output: str) -> None:
    """Runs under any Python with transformers: this folder's ids for the texts and chats."""
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    data = json.loads(Path(inputs).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    reference = tokenizers.Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))

    def ids_of(chat):
        out = tokenizer.apply_chat_template(chat["messages"], add_generation_prompt=chat["prompt"])
        return list(out["input_ids"]) if hasattr(out, "keys") else list(out)  # 5.x: a dict

    texts = data["texts"]
    result = {
        "transformers": transformers.__version__, "class": type(tokenizer).__name__,
        "keys": sorted(tokenizer("x").keys()), "padding_side": tokenizer.padding_side,
        "ids": [tokenizer(t)["input_ids"] for t in texts],
        "reference": [reference.encode(t).ids for t in texts],
        "chat_text": [tokenizer.apply_chat_template(c["messages"], add_generation_prompt=c["prompt"],
                                                    tokenize=False) for c in data["chats"]],
        "chat_ids": [ids_of(c) for c in data["chats"]],
    }
    result["chat_reference"] = [reference.encode(t).ids for t in result["chat_text"]]
    # the reference ids decoded: what an engine's detokenizer turns generated ids into
    result["decoded"] = [tokenizer.decode(ids) for ids in result["reference"] + result["chat_reference"]]
    Path(output).write_text(json.dumps(result))


def sample(spec_path: Path, n: int, test: Path | None = None) -> dict:
    """Texts and chats from ``test`` (default: the pipeline's prepare/test.jsonl) when it
    exists, else from generated tickets."""
    from llmops.spec import load_spec

    spec = load_spec(spec_path, [])
    name, pipe = spec.pipeline(None)
    test = test or spec.artifacts_dir(spec_path.parent) / name / "prepare" / "test.jsonl"
    if test.exists():
        chats = [json.loads(line)["messages"] for line in test.read_text().splitlines()[:n]]
        source = str(test)
    else:
        chats, source = generated_chats(pipe.task, n), f"{n} generated tickets"
    texts = [m["content"] for chat in chats for m in chat[1:]] + EXTRA_TEXTS
    rendered = ([{"messages": c[:-1], "prompt": True} for c in chats] + [{"messages": c, "prompt": False} for c in chats]
                + [{"messages": c[1:-1], "prompt": True} for c in chats]
                + [{"messages": [{"role": "user", "content": t}], "prompt": True} for t in EXTRA_TEXTS])
    return {"source": source, "texts": texts, "chats": rendered}


def generated_chats(task, n: int) -> list[list[dict]]:
    from components import generate
    from components.task import answer_json, build_messages

    data = generate.generate(n_tickets=n, n_customers=max(5, n // 4), seed=11)
    profiles = data.customer_profiles.drop_duplicates("customer_id", keep="last").set_index("customer_id")
    articles = data.articles.set_index("article_id")
    chats = []
    for ticket in data.tickets.to_dict("records"):
        row = ticket | {"plan": profiles.plan.get(ticket["customer_id"]), "account_weight": None}
        shown = [{"article_id": ticket["article_id"], "title": articles.title[ticket["article_id"]]}]
        chats.append(build_messages(row, task, shown) + [{"role": "assistant", "content": answer_json(ticket, task)}])
    return chats


def run_worker(python: str, folder: Path, inputs: Path) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run([python, __file__, "--worker", str(folder.resolve()), str(inputs), out.name],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{python} on {folder} failed:\n{proc.stderr.strip()[-3000:]}")
        return json.loads(Path(out.name).read_text())


def figures(r: dict, base: dict) -> dict[str, str]:
    """How many of ``r``'s results equal the tokenizer.json reference and the baseline's."""
    def same(key: str, other: list) -> str:
        return f"{sum(x == y for x, y in zip(r[key], other))}/{len(other)}"

    return {"ids = tokenizer.json": same("ids", r["reference"]), "ids = baseline": same("ids", base["ids"]),
            "chat text = baseline": same("chat_text", base["chat_text"]),
            "chat ids = baseline": same("chat_ids", base["chat_ids"]),
            "chat ids = tokenizer.json(chat text)": same("chat_ids", r["chat_reference"]),
            "decoded = baseline": same("decoded", base["decoded"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, action="append",
                        help="a model folder (repeatable; default: finetune.base_model); the first is the baseline")
    parser.add_argument("--python", action="append", default=[], help="another Python to compare (repeatable)")
    parser.add_argument("--spec", type=Path, default=ROOT / "pipelines.yaml")
    parser.add_argument("--chats", type=Path, help="a prepare stage's .jsonl (default: the pipeline's test split)")
    parser.add_argument("--n", type=int, default=40, help="chats (each gives texts and 3 renderings)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if not args.folder:
        from bench.common import base_model_or_exit
        from llmops.spec import load_spec

        spec = load_spec(args.spec.resolve(), [])
        args.folder = [Path(base_model_or_exit(spec, spec.pipeline(None)[1]))]
    data = sample(args.spec.resolve(), args.n, args.chats)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.json"
        inputs.write_text(json.dumps(data))
        runs = [(python, folder, run_worker(python, folder, inputs))
                for python in [sys.executable, *args.python] for folder in args.folder]
    base = runs[0][2]
    print(f"{len(data['texts'])} texts, {len(data['chats'])} chats, {len(base['decoded'])} id lists decoded "
          f"(from {data['source']}); baseline: {args.folder[0]} under transformers {base['transformers']}")
    rows = []
    for python, folder, r in runs:
        row = {"folder": str(folder), "tokenizer.model": (folder / "tokenizer.model").exists(), "python": python,
               **{k: r[k] for k in ("transformers", "class", "keys", "padding_side")}, "figures": figures(r, base)}
        rows.append(row)
        print(f"\n{folder.name}{' (with tokenizer.model)' if row['tokenizer.model'] else ''} under transformers "
              f"{r['transformers']} ({python}): {r['class']}, returns {', '.join(r['keys'])}, "
              f"padding {r['padding_side']}")
        for key, value in row["figures"].items():
            print(f"  {key:38} {value}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
