"""What users would run instead of actcache, as whole processes: `python bench/contenders.py bare|st ...`.

- bare: load the model, tokenize the texts, form length-sorted batches and run
  `model(**batch, output_hidden_states=True)`, discarding the outputs: the physical floor.
- st: `SentenceTransformer.encode` of the same texts (keeps only the final embedding).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def texts_of(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def bare(
    model_dir: str, texts: list[str], batch_size: int, max_length: int, *, device: str = "cpu",
    dtype: str = "float32", warm_up: bool = False,
) -> dict[str, float]:  # fmt: skip
    """The bare loop; returns its token count and seconds (tokenizing, the forward loop, both).

    `warm_up` runs one batch before the clock starts (a GPU's kernels chosen, its allocator
    grown); on a GPU the loop ends with a synchronize, so the seconds are the work's.
    """
    import time

    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    if warm_up:
        with torch.inference_mode():
            first = tokenizer(
                texts[:batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            model(**first.to(device), output_hidden_states=True)
        sync()
    started = time.perf_counter()
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    tokenized = time.perf_counter()
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = [{"input_ids": encoded[i]} for i in order[start : start + batch_size]]
            batch = tokenizer.pad(rows, return_tensors="pt")
            model(**batch.to(device), output_hidden_states=True)
    sync()
    done = time.perf_counter()
    return {"tokens": sum(map(len, encoded)), "tokenize_s": tokenized - started, "forward_s": done - tokenized,
            "total_s": done - started}  # fmt: skip


def st(model_dir: str, texts: list[str], batch_size: int) -> None:
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(model_dir, device="cpu").encode(texts, batch_size=batch_size)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=("bare", "st"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    texts = texts_of(args.data)
    if args.which == "bare":
        bare(args.model, texts, args.batch_size, args.max_length)
    else:
        st(args.model, texts, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
